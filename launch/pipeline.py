"""The main job as one pipeline: corpus -> queries -> relabel -> mine -> train -> evaluate -> export -> serve.

    bash launch/pipeline.sh                      # CPU, offline, the built-in default (sets up .venv)
    .venv/bin/python launch/pipeline.py [--out runs/pipeline] [--procs 2]

Each stage runs the project's own command line and records what it did in
``<out>/stages/<stage>.json`` (command, fingerprints of the files it reads, wall time); a rerun
skips finished stages whose command and inputs are unchanged, and the training stage resumes
from its last checkpoint, so a killed pipeline, rerun with the same command, continues. Training
writes to ``<out>/run-<fingerprint of config and data>``: an edited config trains anew. Stages:

1. ``corpus`` + ``synth`` + ``relabel``: queries grounded in a corpus (``synth.generate --corpus``):
   by default the chatterbot English training split's answers (answers only; no question is
   shown, and the held-out split stays unseen), or ``--corpus FILE``, your own documents. The
   default generator writes one question per passage from a few-shot prompt; ``synth.relabel``
   has the same LLM pick each query's positive among the passage and its nearest neighbours
   under the teacher, and drops queries that do not find their own passage again (round trip).
   With ``--corpus``, ``synth_split`` holds out one passage in ten (with every query whose
   positive it is) as a synthetic held-out task, the one test your documents have (by default
   the chatterbot held-out split is the test, and every synthetic pair trains). ``--invent`` runs E5-mistral's scheme instead (the generator
   invents both sides; a strong generator's job), filtered by text checks and the teacher's
   score (pairs under 0.4 dropped, Conan's rule).
2. ``data`` + ``mine``: chatterbot-corpus pairs (packaged; not with ``--corpus``, where your
   documents' synthetic pairs are all the training data) and the synthetic training pairs, hard
   negatives mined by the teacher with the positive-aware rule (optionally re-scored by
   ``--cross-encoder``).
3. ``train_seed<N>`` for each of ``--seeds``: LoRA on the default backbone under DeepSpeed ZeRO-2
   on ``--procs`` CPU processes; ``merge``: the seeds' models averaged weight by weight and the
   average's change from the pretrained backbone scaled by ``--merge-scale`` (``llmembed.merge
   --method linear --scale``), which is what the later stages evaluate and ship. One seed at
   scale 1 skips it.
4. ``evaluate``: the offline suite plus the synthetic held-out split, for the reference
   (all-MiniLM-L6-v2), the untrained configuration and the trained model.
5. ``export`` (checked by ``llmembed.serve.verify``), then the export scored again through
   sentence-transformers, and one query answered by the reloaded export.

``--train-config launch/configs/pipeline_gpu.yaml`` with ``--synth-backend vllm`` and a 7B
generator runs the same stages as the GPU recipe (README, "The main job on GPUs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmembed.outputs import Kind, OutputError, check_output, folder_with, write_text

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_TEACHER_SCORE = 0.4
PIPELINE_KIND = Kind("a pipeline folder (no stages/ in it)", folder=True, recognise=folder_with("stages"))


@dataclass
class PipelineSettings:
    """What changes between the CPU main job (the defaults) and the GPU recipe (see the README):
    generator and its backend, how much to generate, the teacher that filters and mines, an
    optional reranker, the training config and how many processes train."""

    train_config: Path = REPO / "launch" / "configs" / "pipeline.yaml"
    procs: int = 2
    # Your own documents ({"text"} or {"id", "text"} lines): queries are written for them and
    # they are all the training data. None: the chatterbot English training answers, with the
    # real chatterbot pairs beside the synthetic ones.
    corpus: Path | None = None
    queries_per_passage: int = 1
    max_passages: int | None = None  # a seeded sample of the corpus gets queries (all are candidates)
    query_kinds: list[str] = field(default_factory=lambda: ["question"])
    relevance: bool = False  # synth.relabel --relevance (worth it with a larger generator)
    round_trip_k: int = 2
    invent: bool = False  # E5-mistral's scheme (synth.generate without --corpus) instead
    synth_backend: str = "transformers"
    generator: str = "default"
    synth_tasks: int = 6
    synth_examples: int = 3
    synth_temperature: float = 0.7
    # A 135M generator writes gibberish in most languages it is asked for (seen: Russian and
    # Portuguese word salad); English only on CPU. Empty: the taxonomy's weighted languages.
    synth_languages: list[str] = field(default_factory=lambda: ["English"])
    synth_args: list[str] = field(default_factory=list)
    teacher: str | None = None  # None: the packaged all-MiniLM-L6-v2
    cross_encoder: str | None = None
    ranks: str = "3:30"
    num_negatives: int = 3
    # Train once per seed and average the models (a model soup): on the dev split the average of
    # two seeds scored above either seed's mean. The synthetic pairs make each run longer, so the
    # CPU default trains one seed to stay within the main job's time (--seeds 42 7 for the soup).
    seeds: list[int] = field(default_factory=lambda: [42])
    # Task arithmetic's scaling of the merged change (llmembed.merge --scale): 1.25 raised the
    # English dev score of every model of the CPU recipe, merged or single; larger scales gained
    # less. Measured on the CPU recipe only. Both: bench/results/cpu_recipe.md.
    merge_scale: float = 1.25


class Pipeline:
    def __init__(self, out: Path, settings: PipelineSettings) -> None:
        self.out = out
        self.settings = settings
        self.procs = settings.procs
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.data = out / "data"
        self.data.mkdir(exist_ok=True)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.times: dict[str, float] = {}
        # The training processes' rendezvous port, one per output folder: two pipelines on one
        # machine do not both take DeepSpeed's default, and a rerun keeps its command unchanged.
        self.port = 29500 + 1 + int(hashlib.sha256(str(out).encode()).hexdigest()[:8], 16) % 2000

    def stage(self, name: str, commands: list[list[str]], inputs: tuple[Path | str | None, ...] = (),
              outputs: tuple[Path, ...] = ()) -> None:
        """Run ``commands`` unless ``name`` finished before with the same commands on the same
        ``inputs`` (every file and folder the commands read: an edited config, a regenerated
        data file or a retrained teacher reruns the stage though its command line is unchanged)
        and its ``outputs`` are all still there (a deleted output is made again)."""
        marker = self.stages / f"{name}.json"
        shown = [[_shown(arg) for arg in command] for command in commands]  # no credentials on disk
        inputs_now = {str(p): fingerprint(Path(p)) for p in inputs if p is not None}
        if marker.is_file():
            done = json.loads(marker.read_text())
            missing = [str(p) for p in outputs if not p.exists()]
            if done.get("commands") == shown and done.get("inputs", {}) == inputs_now and not missing:
                self.times[name] = done["wall_s"]
                print(f"[pipeline] {name}: done before, skipped", flush=True)
                return
            if missing:
                print(f"[pipeline] {name}: output {missing[0]} is missing; running it again", flush=True)
        print(f"[pipeline] {name} ...", flush=True)
        started = time.perf_counter()
        for command, line in zip(commands, shown):
            print("  $ " + " ".join(line), flush=True)
            result = subprocess.run(command, cwd=REPO, env=self.env)
            if result.returncode != 0:
                raise SystemExit(f"[pipeline] stage {name} failed (exit {result.returncode}); fix and rerun: "
                                 "finished stages are kept")
        self.times[name] = round(time.perf_counter() - started, 1)
        write_text(marker, json.dumps({"commands": shown, "inputs": inputs_now, "wall_s": self.times[name]},
                                      indent=2))

    def run(self) -> None:
        from llmembed.serve.encoders import reference_model_dir

        opts = self.settings
        teacher = opts.teacher or str(reference_model_dir())
        chatterbot = self.data / "chatterbot"
        self.stage("data", [[PY, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(chatterbot), "--overwrite"]],
                   outputs=(chatterbot / "train.jsonl", chatterbot / "heldout.jsonl"))
        if opts.invent:
            synth_train, synth_heldout = self.invented(teacher)
        else:
            synth_train, synth_heldout = self.grounded(teacher, chatterbot / "train.jsonl")
        sources = [self.mine(synth_train, "synthetic", teacher)]
        if opts.corpus is None:  # the real pairs beside the synthetic ones
            sources.insert(0, self.mine(chatterbot / "train.jsonl", "chatterbot", teacher))
        config = opts.train_config
        # One training file: synthetic and real pairs share batches (a record without hard
        # negatives borrows other records' positives).
        mixed = self.data / "train_mixed.jsonl"
        self.stage("combine", [[PY, str(REPO / "launch" / "pipeline.py"), "--concat", str(mixed), *map(str, sources)]],
                   inputs=tuple(sources), outputs=(mixed,))
        # One run folder per (config, data, seed): an edited config trains anew instead of
        # resuming checkpoints made under the old one, and every later stage follows the new folder.
        key = fingerprint(config, mixed)[:10]
        finals = []
        for seed in opts.seeds:
            overrides = [f"checkpoint.output_dir={self.out / f'run-{key}-seed{seed}'}", f"loss.teacher_model={teacher}",
                         f"train.seed={seed}", f"data.datasets=[{{path: {mixed}, name: mixed, group_size: 2}}]"]
            self.stage(f"train_seed{seed}", [[PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.procs),
                                              "--master_port", str(self.port), str(REPO / "launch" / "train.py"), "--config", str(config), "--resume",
                                              "auto", *(arg for o in overrides for arg in ("--set", o))]],
                       inputs=(config, mixed, teacher), outputs=(final_model_dir(config, overrides),))
            finals.append(final_model_dir(config, overrides))
        final = finals[0]
        if len(finals) > 1 or opts.merge_scale != 1.0:  # a model soup, its change from the base scaled
            final = self.out / f"merged-{key}"
            self.stage("merge", [[PY, "-m", "llmembed.merge", *map(str, finals), "--method", "linear",
                                  "--scale", f"{opts.merge_scale:g}", "--overwrite", "--out", str(final)]],
                       inputs=tuple(finals), outputs=(final,))
        records = ["--data", str(synth_heldout)] if synth_heldout.stat().st_size else []
        self.stage("evaluate", [[PY, "-m", "llmembed.evaluate", "--model", str(final), "--suite", "offline",
                                 *records, "--reference", "--baseline", "--json", str(self.out / "scores.json"),
                                 "--overwrite"]],
                   inputs=(final, synth_heldout), outputs=(self.out / "scores.json",))
        export = self.out / "export"
        vllm = [f"--vllm-python={REPO / '.venv-vllm' / 'bin' / 'python'}"] if (REPO / ".venv-vllm" / "bin" /
                                                                               "python").is_file() else []
        self.stage("export", [[PY, "-m", "llmembed.serve.export", "--model", str(final), "--out", str(export),
                               "--overwrite", *vllm]], inputs=(final,), outputs=(export,))
        # Answer one question the model never saw: a held-out chatterbot question, or with your
        # own corpus a synthetic held-out query.
        asked = synth_heldout if opts.corpus is not None and synth_heldout.stat().st_size else chatterbot / "heldout.jsonl"
        self.stage("serve", [
            [PY, "-m", "llmembed.evaluate", "--model", str(export), "--backend", "sentence-transformers",
             "--suite", "offline", *records, "--json", str(self.out / "scores_export_st.json"), "--overwrite"],
            [PY, str(REPO / "launch" / "pipeline.py"), "--answer", str(export), str(asked)],
        ], inputs=(export, synth_heldout, asked), outputs=(self.out / "scores_export_st.json",))
        self.report()

    def grounded(self, teacher: str, chatterbot_train: Path) -> tuple[Path, Path]:
        """Queries written for the corpus's passages, relabelled and round-trip filtered by the
        generator LLM, split into training and held-out pairs by passage."""
        opts = self.settings
        corpus = opts.corpus
        instruction: list[str] = []
        if corpus is None:  # the chatterbot training answers, and the chatterbot task's instruction
            from llmembed.data.packaged import INSTRUCTION

            corpus = self.data / "chatterbot_answers.jsonl"
            self.stage("corpus", [[PY, str(REPO / "launch" / "pipeline.py"), "--answers", str(chatterbot_train),
                                   str(corpus)]], inputs=(chatterbot_train,), outputs=(corpus,))
            instruction = ["--instruction", INSTRUCTION]
        generator = opts.generator if Path(opts.generator).is_dir() else None
        synth = self.out / "synth"
        self.stage("synth", [
            [PY, "-m", "synth.generate", "--out", str(synth), "--corpus", str(corpus), "--backend", opts.synth_backend,
             "--model", opts.generator, "--query-kinds", *opts.query_kinds, "--queries-per-passage",
             str(opts.queries_per_passage), *(["--max-passages", str(opts.max_passages)] if opts.max_passages else []),
             "--temperature", str(opts.synth_temperature), "--max-tokens", "40",
             "--passage-max-tokens", "128", "--batch-size", "32", "--no-progress", *instruction, *opts.synth_args],
        ], inputs=(generator, corpus), outputs=(synth / "manifest.json",))
        relabelled = self.data / "synthetic_relabelled.jsonl"
        scorer = ["--backend", opts.synth_backend] if opts.synth_backend != "openai" else []
        self.stage("relabel", [
            [PY, "-m", "synth.relabel", "--input", str(synth), "--embedder", teacher, "--out", str(relabelled),
             "--model", opts.generator, *scorer, "--round-trip-k", str(opts.round_trip_k), "--batch-size", "32",
             *(["--relevance"] if opts.relevance else []), "--no-progress", "--overwrite"],
        ], inputs=(synth / "manifest.json", teacher, generator), outputs=(relabelled,))
        train, heldout = self.data / "synthetic_train.jsonl", self.data / "synthetic_heldout.jsonl"
        if opts.corpus is None:  # the chatterbot held-out split is the test; every synthetic pair trains
            write_text(heldout, "")
            return relabelled, heldout
        self.stage("synth_split", [[PY, str(REPO / "launch" / "pipeline.py"), "--split-synthetic", str(relabelled),
                                    str(train), str(heldout)]], inputs=(relabelled,), outputs=(train, heldout))
        return train, heldout

    def invented(self, teacher: str) -> tuple[Path, Path]:
        """E5-mistral's scheme: the generator invents both sides; text checks and the teacher's
        score filter both splits (a held-out pair the teacher calls unrelated measures noise)."""
        opts = self.settings
        generator = opts.generator if Path(opts.generator).is_dir() else None
        synth = self.out / "synth"
        merged = synth / "merged"
        self.stage("synth", [
            [PY, "-m", "synth.generate", "--out", str(synth), "--backend", opts.synth_backend, "--model", opts.generator,
             "--categories", "short_long", "short_short", "--num-tasks", str(opts.synth_tasks),
             "--examples-per-task", str(opts.synth_examples), "--temperature", str(opts.synth_temperature),
             "--max-tokens", "256", "--max-field-chars", "400", "--no-progress",
             *(["--languages", *opts.synth_languages] if opts.synth_languages else []), *opts.synth_args],
            [PY, "-m", "synth.merge", "--out", str(synth), "--heldout-share", "0.5", "--overwrite"],
        ], inputs=(generator,), outputs=(merged / "train.jsonl", merged / "heldout.jsonl"))
        return (self.filter_synthetic(merged / "train.jsonl", "synth_train", teacher),
                self.filter_synthetic(merged / "heldout.jsonl", "synth_heldout", teacher))

    def mine(self, records: Path, name: str, teacher: str) -> Path:
        """Hard negatives by the teacher (positive-aware), re-scored by --cross-encoder if given."""
        opts = self.settings
        mined = self.data / f"{name}_mined.jsonl"
        count = sum(1 for line in records.read_text(encoding="utf-8").splitlines() if line.strip())
        if count <= int(opts.ranks.split(":")[1]):  # too few to mine from each other: used as they are
            print(f"[pipeline] mine_{name}: {count} records, fewer than the rank window; not mined", flush=True)
            write_text(mined, records.read_text(encoding="utf-8"))
            return mined
        reranker = ["--cross-encoder", opts.cross_encoder] if opts.cross_encoder else []
        self.stage(f"mine_{name}", [
            [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(records), "--out", str(mined), "--ranks",
             opts.ranks, "--num-negatives", str(opts.num_negatives), "--no-progress", "--overwrite", *reranker],
        ], inputs=(records, teacher, opts.cross_encoder), outputs=(mined,))
        return mined

    def filter_synthetic(self, source: Path, name: str, teacher: str) -> Path:
        """Cheap text checks, then the teacher's score filter (Conan's: positive under 0.4 dropped)."""
        sane, filtered = self.data / f"{name}_sane.jsonl", self.data / f"{name}.jsonl"
        self.stage(f"{name}_sanity", [[PY, str(REPO / "launch" / "pipeline.py"), "--sanity-filter", str(source),
                                       str(sane)]], inputs=(source,), outputs=(sane,))
        if sum(1 for line in sane.read_text(encoding="utf-8").splitlines() if line.strip()) < 2:
            print(f"[pipeline] {name}: fewer than 2 pairs passed the text checks; none kept", flush=True)
            write_text(filtered, "")
            return filtered
        if filtered.is_file() and not filtered.stat().st_size:
            filtered.unlink()  # the placeholder above, from a run with fewer pairs: mine writes it now
        self.stage(f"{name}_filter", [
            [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(sane), "--out", str(filtered),
             "--min-positive-score", str(MIN_TEACHER_SCORE), "--ranks", "0:1", "--num-negatives", "1",
             "--keep-existing-negatives", "--no-progress", "--overwrite"]], inputs=(sane, teacher), outputs=(filtered,))
        return filtered

    def report(self) -> None:
        from llmembed.evaluate import runner

        trained = json.loads((self.out / "scores.json").read_text())
        served = json.loads((self.out / "scores_export_st.json").read_text())
        rows = dict(trained["scores"])
        for name, scores in served["scores"].items():
            rows[f"{name} via sentence-transformers"] = scores
        reference = next(n for n, m in trained["models"].items() if m["kind"] == "sentence-transformers")
        print()
        print(runner.table(rows, reference))
        suite_only = {n: {t: s for t, s in r.items() if not t.startswith("RecordsRetrieval.")} for n, r in rows.items()}
        print("\naverage over the suite without / with the synthetic held-out task:")
        for name in rows:
            print(f"  {name:<40} {runner.average(suite_only[name]):.4f} / {runner.average(rows[name]):.4f}")
        print("\nwall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in self.times.items()))


def final_model_dir(config: Path, overrides: list[str]) -> Path:
    """Where training leaves its model: ``<output_dir>/final``, or for a config with stages
    (each trained into its own folder) the last stage's."""
    from llmembed.train.config import load_plan

    return Path(load_plan(config, overrides)[-1].config.checkpoint.output_dir) / "final"


def fingerprint(*paths: Path) -> str:
    """sha256 over the files' contents; a folder counts as its files (names and contents, large
    weight files by their ends: :func:`llmembed.serve.encoders.folder_fingerprint`), a missing path as
    empty."""
    from llmembed.serve.encoders import folder_fingerprint

    digest = hashlib.sha256()
    for path in paths:
        if path.is_dir():
            digest.update(folder_fingerprint(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(b"\0")
    return digest.hexdigest()


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def _shown(arg: str) -> str:
    """A command-line argument fit to print and record: URLs in it lose their credentials."""
    if "://" not in arg:
        return arg
    from synth.backends.openai_backend import redact_url

    return _URL.sub(lambda match: redact_url(match.group(0)), arg)


_LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)


def sanity_filter(source: Path, target: Path) -> None:
    """Cheap checks before the teacher: enough letters, mostly words, no runaway repetition,
    query and positive not the same text. Counts by reason."""
    from collections import Counter

    kept, dropped = [], Counter()
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        query, positive = record["query"].strip(), record["positive"]
        positive = positive if isinstance(positive, str) else positive[0]
        words = positive.split()
        if len(query) < 8 or len(positive) < 20:
            dropped["too_short"] += 1
        elif sum(1 for c in query + positive if _LETTERS.match(c)) < 0.6 * len(query + positive):
            dropped["few_letters"] += 1
        elif len(words) >= 8 and len(set(words)) < 0.4 * len(words):
            dropped["repetitive"] += 1
        elif query.lower() == positive.strip().lower():
            dropped["query_equals_positive"] += 1
        else:
            kept.append(line)
    write_text(target, "".join(l + "\n" for l in kept))
    print(f"sanity filter: kept {len(kept)}, dropped {dict(dropped)}")


def answers_corpus(train: Path, target: Path) -> None:
    """The training pairs' answers as a corpus of passages: no question reaches the generator."""
    rows = [json.loads(l) for l in train.read_text(encoding="utf-8").splitlines() if l.strip()]
    write_text(target, "".join(json.dumps({"id": f"answer{n}", "text": r["positive"]}, ensure_ascii=False) + "\n"
                               for n, r in enumerate(rows)))
    print(f"{target}: {len(rows)} passages")


HELDOUT_PASSAGES = 0.1


def split_synthetic(source: Path, train: Path, heldout: Path) -> None:
    """One passage in ten is held out with every relabelled query whose positive it is, so no
    held-out positive is ever a training positive."""
    kept: dict[str, list[str]] = {"train": [], "heldout": []}
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        passage = json.loads(line)["meta"]["relabel"]["positive_passage_id"]
        bucket = int(hashlib.sha256(f"heldout:{passage}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        kept["heldout" if bucket < HELDOUT_PASSAGES else "train"].append(line)
    write_text(train, "".join(l + "\n" for l in kept["train"]))
    write_text(heldout, "".join(l + "\n" for l in kept["heldout"]))
    print(f"synthetic pairs: {len(kept['train'])} train, {len(kept['heldout'])} held out")


def answer(export: Path, heldout: Path) -> None:
    """Reload the export in plain sentence-transformers and answer one held-out question."""
    from sentence_transformers import SentenceTransformer

    records = [json.loads(l) for l in heldout.read_text(encoding="utf-8").splitlines() if l.strip()]
    model = SentenceTransformer(str(export), device="cpu")
    question = records[0]["query"]
    answers = [r["positive"] for r in records]
    scores = model.similarity(model.encode([question], prompt_name="query"), model.encode(answers))[0]
    best = int(scores.argmax())
    print(f"question: {question}\nanswer:   {answers[best]}  (cos {float(scores[best]):.3f}; "
          f"{'the labelled answer' if best == 0 else 'labelled: ' + answers[0]})")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from llmembed.argtypes import float_in, int_at_least

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pipeline")
    defaults = PipelineSettings()
    parser.add_argument("--procs", type=int_at_least(1), default=defaults.procs, help="training processes (CPU cores or GPUs)")
    parser.add_argument("--train-config", type=Path, default=defaults.train_config,
                        help="training YAML (default: launch/configs/pipeline.yaml; GPU: pipeline_gpu.yaml)")
    parser.add_argument("--corpus", type=Path, help='your own documents ({"text"} or {"id", "text"} lines): queries '
                        "are written for them and they are all the training data (default: the chatterbot answers, "
                        "beside the real pairs)")
    parser.add_argument("--queries-per-passage", type=int_at_least(1), default=defaults.queries_per_passage)
    parser.add_argument("--max-passages", type=int_at_least(1),
                        help="write queries for a seeded sample of this many passages (every passage stays a candidate)")
    parser.add_argument("--query-kinds", nargs="+", default=defaults.query_kinds,
                        help="synth.generate --query-kinds (question keywords claim title)")
    parser.add_argument("--relevance", action="store_true", help="synth.relabel --relevance (a larger generator)")
    parser.add_argument("--round-trip-k", type=int_at_least(1), default=defaults.round_trip_k)
    parser.add_argument("--invent", action="store_true",
                        help="E5-mistral's scheme instead: the generator invents queries and passages (a strong generator)")
    parser.add_argument("--synth-backend", choices=("transformers", "vllm", "openai"), default=defaults.synth_backend)
    parser.add_argument("--generator", default=defaults.generator, help="synth's --model (default: built-in SmolLM2)")
    parser.add_argument("--synth-tasks", type=int_at_least(1), default=defaults.synth_tasks, help="task definitions per category")
    parser.add_argument("--synth-examples", type=int_at_least(1), default=defaults.synth_examples, help="examples per task")
    parser.add_argument("--synth-temperature", type=float, default=defaults.synth_temperature)
    parser.add_argument("--synth-languages", nargs="*", default=defaults.synth_languages,
                        help="languages to generate (default English; give none for the taxonomy's weighted list)")
    parser.add_argument("--synth-arg", action="append", default=[], metavar="ARG",
                        help="passed on to synth.generate (repeat; e.g. --synth-arg=--tensor-parallel-size=2)")
    parser.add_argument("--teacher", help="embedding model that filters and mines (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--cross-encoder", help="reranker that re-scores mined candidates (llmembed.mine --cross-encoder)")
    parser.add_argument("--ranks", default=defaults.ranks, help="mining rank window START:END")
    parser.add_argument("--num-negatives", type=int_at_least(1), default=defaults.num_negatives)
    parser.add_argument("--seeds", nargs="+", type=int_at_least(0), default=defaults.seeds,
                        help="train once per seed; several are merged into one model (default: 42)")
    parser.add_argument("--merge-scale", type=float_in(0.0, low_open=True), default=defaults.merge_scale,
                        help="scale of the merged model's change from the pretrained backbone (llmembed.merge "
                             f"--scale; default {defaults.merge_scale:g}; 1 with one seed skips the merge)")
    parser.add_argument("--sanity-filter", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--answer", nargs=2, metavar=("EXPORT", "HELDOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--concat", nargs="+", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--answers", nargs=2, metavar=("TRAIN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--split-synthetic", nargs=3, metavar=("IN", "TRAIN", "HELDOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.corpus is not None and not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file")
    if args.corpus is not None and args.invent:
        parser.error("--corpus and --invent: a corpus is for grounded queries; pick one")
    if not args.train_config.is_file():
        parser.error(f"--train-config {args.train_config}: no such file")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once (the same seed trains the same model)")
    return args


def settings_of(args: argparse.Namespace) -> PipelineSettings:
    return PipelineSettings(
        train_config=args.train_config.absolute(), procs=args.procs,
        corpus=args.corpus.absolute() if args.corpus else None, queries_per_passage=args.queries_per_passage,
        max_passages=args.max_passages, query_kinds=args.query_kinds, relevance=args.relevance, round_trip_k=args.round_trip_k, invent=args.invent,
        synth_backend=args.synth_backend,
        generator=args.generator, synth_tasks=args.synth_tasks, synth_examples=args.synth_examples,
        synth_temperature=args.synth_temperature, synth_languages=args.synth_languages, synth_args=args.synth_arg,
        teacher=args.teacher, cross_encoder=args.cross_encoder, ranks=args.ranks, num_negatives=args.num_negatives,
        seeds=args.seeds, merge_scale=args.merge_scale)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.concat:
        target, *sources = (Path(p) for p in args.concat)
        text = "".join(p.read_text(encoding="utf-8") for p in sources)
        write_text(target, text)
        print(f"{target}: {sum(1 for l in text.splitlines() if l.strip())} records from {len(sources)} files")
        return 0
    if args.sanity_filter:
        sanity_filter(Path(args.sanity_filter[0]), Path(args.sanity_filter[1]))
        return 0
    if args.answer:
        answer(Path(args.answer[0]), Path(args.answer[1]))
        return 0
    if args.answers:
        answers_corpus(Path(args.answers[0]), Path(args.answers[1]))
        return 0
    if args.split_synthetic:
        split_synthetic(*(Path(p) for p in args.split_synthetic))
        return 0
    settings = settings_of(args)
    out = Path(args.out).absolute()
    try:
        inputs = [settings.train_config, settings.teacher, settings.cross_encoder, settings.corpus,
                  settings.generator if Path(settings.generator).is_dir() else None]
        check_output(out, inputs=inputs, kind=PIPELINE_KIND, continues=True)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Pipeline(out, settings).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job as one pipeline: synth -> filter -> mine -> train -> evaluate -> export -> serve.

    bash launch/pipeline.sh                      # CPU, offline, the built-in default (sets up .venv)
    .venv/bin/python launch/pipeline.py [--out runs/pipeline] [--procs 2]

Each stage runs the project's own command line and records what it did in
``<out>/stages/<stage>.json`` (command, wall time); a rerun skips finished stages and the
training stage resumes from its last checkpoint, so a killed pipeline, rerun with the same
command, continues. Stages:

1. ``synth``: a small synthetic set from the default generator (transformers backend), merged
   across parts with duplicate removal (``synth.merge``).
2. ``filter``: synthetic pairs the packaged all-MiniLM-L6-v2 teacher scores under 0.4 are dropped
   (Conan's filter, via ``llmembed.mine --min-positive-score``), after cheap text checks.
3. ``data`` + ``mine``: chatterbot-corpus pairs (packaged), hard negatives mined by the teacher
   with the positive-aware rule.
4. ``train``: LoRA on the default backbone under DeepSpeed ZeRO-2 on ``--procs`` CPU processes.
5. ``evaluate``: the offline suite plus the synthetic held-out split, for the reference
   (all-MiniLM-L6-v2), the untrained configuration and the trained model.
6. ``export`` (checked by ``llmembed.verify``), then the export scored again through
   sentence-transformers, and one query answered by the reloaded export.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_TEACHER_SCORE = 0.4


class Pipeline:
    def __init__(self, out: Path, procs: int) -> None:
        self.out = out
        self.procs = procs
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.data = out / "data"
        self.data.mkdir(exist_ok=True)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.times: dict[str, float] = {}

    def stage(self, name: str, commands: list[list[str]]) -> None:
        """Run ``commands`` unless ``name`` finished before with the same commands."""
        marker = self.stages / f"{name}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("commands") == commands:
            self.times[name] = json.loads(marker.read_text())["wall_s"]
            print(f"[pipeline] {name}: done before, skipped", flush=True)
            return
        print(f"[pipeline] {name} ...", flush=True)
        started = time.perf_counter()
        for command in commands:
            print("  $ " + " ".join(command), flush=True)
            result = subprocess.run(command, cwd=REPO, env=self.env)
            if result.returncode != 0:
                raise SystemExit(f"[pipeline] stage {name} failed (exit {result.returncode}); fix and rerun: "
                                 "finished stages are kept")
        self.times[name] = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps({"commands": commands, "wall_s": self.times[name]}, indent=2))

    def run(self) -> None:
        from llmembed.encoders import reference_model_dir

        teacher = str(reference_model_dir())
        synth = self.out / "synth"
        self.stage("synth", [
            [PY, "-m", "synth.generate", "--out", str(synth), "--categories", "short_long", "short_short",
             "--num-tasks", "6", "--examples-per-task", "2", "--temperature", "0.7", "--max-tokens", "256",
             "--max-field-chars", "400", "--no-progress"],
            [PY, "-m", "synth.merge", "--out", str(synth), "--heldout-share", "0.25"],
        ])
        sane, filtered = self.data / "synth_sane.jsonl", self.data / "synth_filtered.jsonl"
        self.stage("sanity", [[PY, str(REPO / "launch" / "pipeline.py"), "--sanity-filter",
                               str(synth / "merged" / "train.jsonl"), str(sane)]])
        if sane.read_text().strip():
            self.stage("filter", [
                [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(sane), "--out", str(filtered),
                 "--min-positive-score", str(MIN_TEACHER_SCORE), "--ranks", "0:1", "--num-negatives", "1",
                 "--keep-existing-negatives", "--no-progress"]])
        else:
            filtered.write_text("")
        self.stage("data", [[PY, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(self.data / "chatterbot")]])
        self.stage("mine", [
            [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(self.data / "chatterbot" / "train.jsonl"),
             "--out", str(self.data / "chatterbot_mined.jsonl"), "--ranks", "3:30", "--num-negatives", "3",
             "--no-progress"],
        ])
        config = REPO / "launch" / "configs" / "pipeline.yaml"
        run_dir = self.out / "run"
        # One training file: the few synthetic pairs that pass both filters on CPU would be a
        # dataset smaller than one batch; with the real pairs they share batches (a record
        # without hard negatives borrows other records' positives).
        mixed = self.data / "train_mixed.jsonl"
        self.stage("combine", [[PY, str(REPO / "launch" / "pipeline.py"), "--concat", str(mixed),
                                str(self.data / "chatterbot_mined.jsonl"), str(filtered)]])
        overrides = ["--set", f"checkpoint.output_dir={run_dir}",
                     "--set", f"data.datasets=[{{path: {mixed}, name: mixed, group_size: 2}}]"]
        self.stage("train", [[PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.procs),
                              str(REPO / "launch" / "train.py"), "--config", str(config), "--resume", "auto",
                              *overrides]])
        synth_heldout = synth / "merged" / "heldout.jsonl"
        records = ["--data", str(synth_heldout)] if synth_heldout.is_file() and synth_heldout.stat().st_size else []
        self.stage("evaluate", [[PY, "-m", "llmembed.evaluate", "--model", str(run_dir / "final"), "--suite", "offline",
                                 *records, "--reference", "--baseline", "--json", str(self.out / "scores.json")]])
        export = self.out / "export"
        vllm = [f"--vllm-python={REPO / '.venv-vllm' / 'bin' / 'python'}"] if (REPO / ".venv-vllm" / "bin" /
                                                                               "python").is_file() else []
        self.stage("export", [[PY, "-m", "llmembed.export", "--model", str(run_dir / "final"), "--out", str(export),
                               "--overwrite", *vllm]])
        self.stage("serve", [
            [PY, "-m", "llmembed.evaluate", "--model", str(export), "--backend", "sentence-transformers",
             "--suite", "offline", *records, "--json", str(self.out / "scores_export_st.json")],
            [PY, str(REPO / "launch" / "pipeline.py"), "--answer", str(export),
             str(self.data / "chatterbot" / "heldout.jsonl")],
        ])
        self.report()

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
    target.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    print(f"sanity filter: kept {len(kept)}, dropped {dict(dropped)}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pipeline")
    parser.add_argument("--procs", type=int, default=2, help="training processes (CPU cores or GPUs)")
    parser.add_argument("--sanity-filter", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--answer", nargs=2, metavar=("EXPORT", "HELDOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--concat", nargs="+", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.concat:
        target, *sources = (Path(p) for p in args.concat)
        text = "".join(p.read_text(encoding="utf-8") for p in sources)
        target.write_text(text, encoding="utf-8")
        print(f"{target}: {sum(1 for l in text.splitlines() if l.strip())} records from {len(sources)} files")
        return 0
    if args.sanity_filter:
        sanity_filter(Path(args.sanity_filter[0]), Path(args.sanity_filter[1]))
        return 0
    if args.answer:
        answer(Path(args.answer[0]), Path(args.answer[1]))
        return 0
    Pipeline(Path(args.out).absolute(), args.procs).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

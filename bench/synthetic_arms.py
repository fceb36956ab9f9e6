"""What the synthetic data adds: four arms trained side by side on the same recipe, scored on the suite.

    .venv/bin/python bench/synthetic_arms.py --out runs/arms             # the arms (test split)
    .venv/bin/python bench/synthetic_arms.py --out runs/arms --queries-per-passage 3 --arms synthetic
    .venv/bin/python bench/synthetic_arms.py --out runs/arms --ablation  # the recipe's steps (dev split)

Arms (``--arms``): the untrained default; **synthetic only** (queries the default generator wrote
for the chatterbot English training answers, relabelled by the same LLM, round-trip filtered: no
real question is seen, and no embedder is distilled; the packaged all-MiniLM-L6-v2 only
retrieves the candidates the LLM judges and mines hard negatives); **real pairs only** (the
chatterbot training pairs); **both**. Every arm trains the main job's recipe (bidirectional
SmolLM2-135M, mean pooling, LoRA r16) without its teacher, for ``--epochs`` epochs of its own
data, one seed, on ``--procs`` DeepSpeed processes; hard negatives are mined the same way for
every arm. ``--queries-per-passage N`` has the generator write N questions per answer (its files
are named apart); the table lists every arm scored in ``--out`` so far. Results:
``bench/results/synthetic_arms.md`` and ``.png``.

Ablation (``--ablation``): synthetic-only models built step by step (generation only; + the
round-trip filter; + LLM relabelling; + distillation of the LLM's query-likelihood scores),
scored on a dev split cut from the chatterbot training pairs (its answers are kept out of the
generation corpus; the test split is never looked at): ``bench/results/synthetic_ablation.md``.

Each step is skipped when its output exists, so a killed run, rerun, continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import save_plot, write_table  # noqa: E402
PY = sys.executable
RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "launch" / "configs" / "pipeline.yaml"
INSTRUCTION = "Given a question, retrieve the answer to it"  # the chatterbot task's own


def run(cmd: list[str], out: Path | None = None, log: Path | None = None) -> None:
    """Run ``cmd`` unless ``out`` exists; the log of each step goes beside the outputs."""
    if out is not None and out.exists():
        print(f"[arms] done before: {out.name}", flush=True)
        return
    print("[arms] $ " + " ".join(map(str, cmd)), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "a") if log else open(os.devnull, "w") as handle:
        result = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, stdout=handle if log else None,
                                stderr=subprocess.STDOUT if log else None)
    if result.returncode:
        raise SystemExit(f"[arms] failed (exit {result.returncode}): see {log}")
    print(f"[arms]   {time.perf_counter() - started:.0f} s", flush=True)


def dev_bucket(query: str) -> bool:
    """One in five training questions forms the dev split (a hash of its own, so the dev split
    is not the packaged held-out split's complement)."""
    return int(hashlib.sha256(f"dev:{query.lower()}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.2


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from llmembed.serve.encoders import reference_model_dir

        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "bench.log"
        self.embedder = str(reference_model_dir())

    def data(self) -> tuple[Path, Path, Path]:
        """Chatterbot training pairs, their answers as the corpus, and the dev split."""
        folder = self.out / "chatterbot"
        run([PY, "-m", "llmembed.data.packaged", "chatterbot", "--out", folder], folder / "train.jsonl", self.log)
        train = read_jsonl(folder / "train.jsonl")
        dev = [r for r in train if dev_bucket(r["query"])]
        fit = [r for r in train if not dev_bucket(r["query"])]
        write_jsonl(self.out / "dev.jsonl", dev)
        write_jsonl(self.out / "fit.jsonl", fit)
        # Answers only: no question reaches the generator.
        write_jsonl(self.out / "corpus_all.jsonl", [{"id": f"a{n}", "text": r["positive"]} for n, r in enumerate(train)])
        write_jsonl(self.out / "corpus_fit.jsonl", [{"id": f"a{n}", "text": r["positive"]} for n, r in enumerate(fit)])
        return folder / "train.jsonl", self.out / "fit.jsonl", self.out / "dev.jsonl"

    def generate(self, corpus: Path, name: str, queries_per_passage: int = 1) -> Path:
        out = self.out / f"synth-{name}"
        run([PY, "-m", "synth.generate", "--out", out, "--corpus", corpus, "--query-kinds", "question",
             "--queries-per-passage", str(queries_per_passage),
             "--instruction", INSTRUCTION, "--temperature", "0.7", "--max-tokens", "40", "--batch-size", "32",
             "--passage-max-tokens", "128", "--seed", "0", "--no-progress"], out / "manifest.json", self.log)
        manifest = json.loads((out / "manifest.json").read_text())
        if not manifest.get("complete"):
            raise SystemExit(f"[arms] {out} is incomplete: rerun")
        return out

    def relabel(self, synth: Path, name: str, round_trip_k: int, negatives: int = 1) -> Path:
        out = self.out / f"relabelled-{name}.jsonl"
        run([PY, "-m", "synth.relabel", "--input", synth, "--embedder", self.embedder, "--out", out,
             "--round-trip-k", str(round_trip_k), "--negatives", str(negatives), "--batch-size", "32",
             "--cache-dir", self.out / "relabel-cache", "--no-progress"], out, self.log)
        return out

    def mine(self, records: Path, name: str) -> Path:
        out = self.out / f"mined-{name}.jsonl"
        run([PY, "-m", "llmembed.mine", "--model", self.embedder, "--input", records, "--out", out, "--ranks", "3:30",
             "--num-negatives", "3", "--no-progress"], out, self.log)
        return out

    def train(self, data: Path, name: str, teacher_scores: str | None = None,
              recipe: tuple[str, ...] = ("loss.teacher_model=null", "loss.structure_weight=0"), seed: int = 42) -> Path:
        """Train the main job's config on ``data``; ``recipe``: overrides of it (default: no teacher)."""
        from launch.stages.training import final_model_dir

        run_dir = self.out / f"run-{name}"
        overrides = [f"checkpoint.output_dir={run_dir}", f"train.epochs={self.args.epochs}", f"train.seed={seed}",
                     *recipe,
                     f"data.datasets=[{{path: {data}, name: {name}, group_size: 2"
                     + (f", teacher_scores: {teacher_scores}" if teacher_scores else "") + "}]"]
        if teacher_scores == "llm":
            # The LLM's scores are mean log-probabilities per query token; over a query of about
            # ten tokens, temperature 0.1 on the mean is the summed likelihood's own scale, i.e.
            # the posterior over the candidates under a uniform prior.
            overrides.append("loss.teacher_temperature=0.1")
        final = final_model_dir(CONFIG, overrides)
        # A port of its own: the bench may run beside a pipeline, whose training takes the default one.
        run([PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.args.procs), "--master_port",
             str(self.args.master_port), REPO / "launch" / "train.py",
             "--config", CONFIG, "--resume", "auto", *(a for o in overrides for a in ("--set", o))], final, self.log)
        return final

    def evaluate(self, model: Path, name: str, suite: bool, data: Path | None = None, baseline: bool = False) -> dict:
        out = self.out / f"scores-{name}.json"
        run([PY, "-m", "llmembed.evaluate", "--model", model, "--suite", "offline" if suite else "none",
             *(["--data", data] if data else []), *(["--baseline"] if baseline else []), "--json", out], out, self.log)
        return json.loads(out.read_text())


def scores_of(report: dict) -> dict[str, dict[str, float]]:
    """{row: {task: main score}} from an evaluate --json report."""
    from llmembed.evaluate.runner import main_score

    return {row: {task: main_score(s) for task, s in tasks.items()} for row, tasks in report["scores"].items()}


def per_passage_tag(queries_per_passage: int) -> str:
    """Output names of a run with several queries per passage differ, so no step reuses another's files."""
    return "" if queries_per_passage == 1 else f"-q{queries_per_passage}"


ARMS = ("synthetic", "real", "both")
LABELS = {"synthetic": "synthetic only", "real": "real pairs only", "both": "both"}


def arms(bench: Bench) -> None:
    train, _, _ = bench.data()
    per_passage = bench.args.queries_per_passage
    tag = per_passage_tag(per_passage)
    synth = bench.generate(bench.out / "corpus_all.jsonl", f"all{tag}", per_passage)
    relabelled = bench.relabel(synth, f"all{tag}", bench.args.round_trip_k)
    synthetic = bench.mine(relabelled, f"synthetic{tag}")
    real = bench.mine(train, "real")
    both = bench.out / f"both{tag}.jsonl"
    if not both.exists():
        write_jsonl(both, read_jsonl(real) + read_jsonl(synthetic))
    for name, data in (("synthetic", synthetic), ("real", real), ("both", both)):
        if name in bench.args.arms:
            run_name = name if name == "real" else f"{name}{tag}"
            bench.evaluate(bench.train(data, run_name), run_name, suite=True, baseline=name == "synthetic")
    write_arms(bench.out, bench.args)


def arm_rows(out: Path) -> tuple[dict[str, dict[str, float]], dict[str, int], list[int]]:
    """Every arm scored in ``out`` so far, under one label per arm and generation setting."""
    rows: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    settings = sorted({1} | {int(p.name.split("-q")[1].split(".")[0]) for p in out.glob("scores-*-q*.json")})
    for per_passage in settings:
        tag = per_passage_tag(per_passage)
        for name in ARMS:
            scores = out / f"scores-{name}{'' if name == 'real' else tag}.json"
            if not scores.exists() or (name == "real" and per_passage != 1):
                continue
            label = LABELS[name] if name == "real" else f"{LABELS[name]} ({per_passage} per answer)"
            data = out / ("mined-real.jsonl" if name == "real" else
                          f"mined-synthetic{tag}.jsonl" if name == "synthetic" else f"both{tag}.jsonl")
            for row, tasks in scores_of(json.loads(scores.read_text())).items():
                if "untrained" in row:
                    rows["untrained"] = tasks
                else:
                    rows[label] = tasks
                    counts[label] = len(read_jsonl(data))
    return rows, counts, settings


def write_arms(out: Path, args: argparse.Namespace) -> None:
    rows, counts, settings = arm_rows(out)
    if not rows:
        return
    rows = {"untrained": rows.pop("untrained"), **rows} if "untrained" in rows else rows
    tasks = list(next(iter(rows.values())))
    lines = ["# Synthetic data, side by side (chatterbot English held-out and the rest of the offline suite)", "",
             "Command: `.venv/bin/python bench/synthetic_arms.py --out runs/arms [--queries-per-passage N]` "
             f"(epochs {args.epochs}, {args.procs} processes, seed 42, round-trip k {args.round_trip_k}; "
             "2-core CPU, default model). \"(N per answer)\": the generator wrote N questions per training answer "
             "before relabelling and the round trip.", "",
             "| arm | training pairs | " + " | ".join(tasks) + " | average |",
             "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for row, scores in rows.items():
        values = [scores[t] for t in tasks]
        lines.append(f"| {row} | {counts.get(row, 0)} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {sum(values) / len(values):.4f} |")
    lines.append("")
    for per_passage in settings:
        tag = per_passage_tag(per_passage)
        synth = out / f"synth-all{tag}"
        manifest = json.loads((synth / "manifest.json").read_text())["totals"]
        stats = json.loads((out / f"relabelled-all{tag}.jsonl.stats.json").read_text())
        lines += [f"{per_passage} per answer: the generator wrote {manifest['generated']} questions for "
                  f"{len(read_jsonl(synth / 'passages.jsonl'))} training answers, {manifest['accepted']} passed the "
                  f"text checks ({manifest['rejected_by_reason']}); the round trip kept {stats['queries_out']} of "
                  f"{stats['queries_in']} ({stats['dropped']}); the positive moved off the seed answer for "
                  f"{stats['positive_moved']} ({stats['positive_moved_share']:.1%} of kept).", ""]
    plt = write_table(RESULTS / "synthetic_arms.md", lines)
    if plt is None:
        return
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for n, (row, scores) in enumerate(rows.items()):
        ax.bar(np.arange(len(tasks)) + n * width, [scores[t] for t in tasks], width, label=row)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [t.replace("Retrieval", "") for t in tasks])
    ax.set_ylabel("main score (nDCG@10, Spearman, accuracy)")
    ax.legend(fontsize="small")
    ax.set_title("Default model trained on synthetic, real or both pairs")
    save_plot(fig, RESULTS / "synthetic_arms.md")


def ablation(bench: Bench) -> None:
    """Synthetic-only models built step by step, on the dev split."""
    _, _, dev = bench.data()
    synth = bench.generate(bench.out / "corpus_fit.jsonl", "fit")
    generated = bench.out / "generated-fit.jsonl"
    if not generated.exists():
        write_jsonl(generated, [r for p in sorted((synth / "shards").glob("*.jsonl")) for r in read_jsonl(p)])
    filtered = bench.relabel(synth, "fit", round_trip_k=bench.args.round_trip_k)
    # Round trip without relabelling: the kept queries with their seed passage as the positive.
    seed_only = bench.out / "roundtrip-seed-fit.jsonl"
    if not seed_only.exists():
        by_query = {r["query"]: r for r in read_jsonl(generated)}
        write_jsonl(seed_only, [{**r, "positive": by_query[r["query"]]["positive"], "negatives": []}
                                for r in read_jsonl(filtered)])
    # name: (training data, run tag, teacher scores, relabelling stats)
    variants = {
        "generation only": (bench.mine(generated, "gen-fit"), "generation", None, None),
        "+ round-trip filter": (bench.mine(seed_only, "roundtrip-fit"), "round-trip", None, None),
        "+ LLM relabelling": (bench.mine(filtered, "relabel-fit"), "LLM", None, filtered),
        "+ distil the LLM's scores": (filtered, "distil", "llm", None),
    }
    per_passage = bench.args.queries_per_passage
    if per_passage > 1:
        tag = per_passage_tag(per_passage)
        more = bench.relabel(bench.generate(bench.out / "corpus_fit.jsonl", f"fit{tag}", per_passage), f"fit{tag}",
                             round_trip_k=bench.args.round_trip_k)
        variants[f"+ LLM relabelling, {per_passage} queries per answer"] = (
            bench.mine(more, f"relabel-fit{tag}"), f"LLM{tag}", None, more)
    rows = {}
    for name, (data, tag, teacher, _) in variants.items():
        model = bench.train(data, f"abl-{tag}", teacher)
        report = scores_of(bench.evaluate(model, f"abl-{tag}", suite=False, data=dev))
        rows[name] = next(v for k, v in report.items() if "untrained" not in k)
    kept = json.loads((bench.out / "relabelled-fit.jsonl.stats.json").read_text())
    lines = ["# Synthetic-only recipe, step by step (chatterbot English dev split, nDCG@10)", "",
             "Command: `.venv/bin/python bench/synthetic_arms.py --out runs/arms --ablation"
             + (f" --queries-per-passage {per_passage}" if per_passage > 1 else "")
             + "`; dev split: one in five chatterbot training questions (its answers are not in the generation "
             "corpus).", "",
             "| step | dev nDCG@10 | records | kept by the round trip | positive moved |", "|---|---:|---:|---:|---:|"]
    for name, (data, _, _, relabelled) in variants.items():
        stats = json.loads(Path(f"{relabelled}.stats.json").read_text()) if relabelled else None
        kept_cell = f"{stats['queries_out']} of {stats['queries_in']}" if stats else ""
        moved = f"{stats['positive_moved_share']:.1%}" if stats else ""
        lines.append(f"| {name} | {next(iter(rows[name].values())):.4f} | {len(read_jsonl(data))} | {kept_cell} "
                     f"| {moved} |")
    lines += ["", f"Round trip: a query stays when its seed answer is within the judge's top {bench.args.round_trip_k} "
              f"(the first relabelling kept {kept['kept_share']:.1%}). Every model: the main job's recipe without its "
              f"teacher, {bench.args.epochs} epochs of its own data, seed 42; one run each.", ""]
    write_table(RESULTS / "synthetic_ablation.md", lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/arms")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--round-trip-k", type=int, default=2)
    p.add_argument("--queries-per-passage", type=int, default=1,
                   help="queries the generator writes per training answer (arms; with --ablation, an extra row)")
    p.add_argument("--master-port", type=int, default=29611, help="the training processes' rendezvous port")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="which arms to train now (the table lists every arm scored in --out)")
    p.add_argument("--ablation", action="store_true", help="the recipe's steps on the dev split instead of the arms")
    args = p.parse_args()
    bench = Bench(args)
    ablation(bench) if args.ablation else arms(bench)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Matryoshka training against plain training: offline-suite scores of truncated embeddings.

    .venv/bin/python bench/matryoshka.py [--seeds 42 7] [--dims 32 64 128 256 576] [--steps 136]
                                         [--weights equal --weights 1,1,1,1,4]

Trains the built-in default (SmolLM2-135M-Instruct, LoRA r16, mean pooling, lr 5e-4, batch 8,
packed) on the packaged chatterbot pairs several times per seed, the same data, steps and seed:
once plain, and once with ``loss.matryoshka_dims`` for each ``--weights`` (``equal``: 1 each;
else ``loss.matryoshka_weights``, one per width of ``--dims``). Runs are interleaved (plain,
Matryoshka, ..., plain, ...). Each model is scored on the offline suite at every
width of ``--dims`` (``llmembed.evaluate --dim``: the first d dimensions, re-normalised) and at
full width. Writes a markdown table (``--out``, default ``bench/results/matryoshka.md``) and, with
matplotlib installed, a plot beside it: the suite mean against the width, per seed.

136 steps are two epochs of the 551 training pairs; one run takes about 4 minutes to train and
1 to score on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, run, save_plot, write_table  # noqa: E402

# The recipe under test: stronger than the quickstart's (last-token, LoRA r8, lr 3e-4), so that
# 136 steps move the in-domain retrieval scores well past the untrained model's.
RECIPE = ["model.pooling.kind=mean", "model.lora.r=16", "model.lora.alpha=32", "train.lr=5e-4",
          "train.warmup_ratio=0.1"]
WIDTH = 576  # the built-in default's embedding width (SmolLM2-135M's hidden size), scored as "full"
SHORT = {"LeeDocSim": "Lee", "PangLeePolarity": "PangLee", "ChatterbotRetrieval.en": "chat-en",
         "ChatterbotRetrieval.zh": "chat-zh"}


def width_scores(folder: Path, dims: list[int], json_out: Path) -> dict[str, dict[str, float]]:
    """Suite scores (main score per task) of ``folder`` at each width: ``{"64": {...}, "full": {...}}``."""
    widths = [str(d) for d in dims] + ["full"]
    cmd = [sys.executable, "-m", "llmembed.evaluate", "--model", str(folder), "--suite", "offline",
           "--json", str(json_out)] + [arg for w in widths for arg in ("--dim", w)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    if proc.returncode:
        raise SystemExit(f"evaluation failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    rows = json.loads(json_out.read_text())["scores"]
    out = {}
    for width in widths:
        (row,) = [scores for name, scores in rows.items()
                  if (name.endswith(f" @{width}d") if width != "full" else "@" not in name)]
        out[width] = {task: next(iter(values.values())) for task, values in row.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256, 576],
                        help=f"Matryoshka widths trained (include {WIDTH}, the full width, to train it too); "
                             "each one below the full width is also scored")
    parser.add_argument("--weights", action="append", metavar="W1,W2,...",
                        help="one Matryoshka run per seed with these weights, one per --dims width in its "
                             "order, or 'equal' (1 each); repeat for more (default: equal, and the widest "
                             "weighing as much as all the others together, 1,1,1,1,4)")
    parser.add_argument("--steps", type=int, default=136)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "matryoshka.md")
    args = parser.parse_args()
    dims = sorted(args.dims)
    arms = {"plain": []}
    # Default arms: equal weights, and the full width weighing as much as all the others together.
    widest_heavy = ",".join(str(len(args.dims) - 1) if d == max(args.dims) else "1" for d in args.dims)
    for spec in args.weights or ["equal", widest_heavy]:
        extra = ["--set", f"loss.matryoshka_dims=[{','.join(map(str, args.dims))}]"]
        if spec != "equal":
            if len(spec.split(",")) != len(args.dims):
                parser.error(f"--weights {spec}: one weight per --dims width ({len(args.dims)})")
            extra += ["--set", f"loss.matryoshka_weights=[{spec}]"]
        arms[f"Matryoshka {spec}"] = extra
    scored = [d for d in dims if d < WIDTH]
    # scores[arm][seed][width][task]
    scores: dict[str, dict[int, dict[str, dict[str, float]]]] = {arm: {} for arm in arms}
    with tempfile.TemporaryDirectory(prefix="llmembed-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(work / "data")],
                       check=True, stdout=subprocess.DEVNULL)
        for seed in args.seeds:
            for index, (arm, extra) in enumerate(arms.items()):
                name = f"arm{index}-{seed}"
                overrides = [x for item in RECIPE + [f"train.seed={seed}"] for x in ("--set", item)] + extra
                run(args.batch, args.steps, 1, work / "data" / "train.jsonl", work, overrides, name)
                scores[arm][seed] = width_scores(work / name / "final", scored, work / f"{name}.json")
                means = {w: statistics.mean(s.values()) for w, s in scores[arm][seed].items()}
                print(f"seed {seed} {arm:<22} suite mean " + "  ".join(f"@{w}: {m:.4f}" for w, m in means.items()),
                      flush=True)
    write_report(args, dims, scores)
    return 0


def write_report(args, dims: list[int], scores) -> None:
    arms = list(scores)
    widths = list(next(iter(scores[arms[0]].values())))
    tasks = list(next(iter(next(iter(scores[arms[0]].values())).values())))

    def mean_over_tasks(arm: str, seed: int, width: str) -> float:
        return statistics.mean(scores[arm][seed][width].values())

    lines = [f"Matryoshka (`loss.matryoshka_dims: {args.dims}`, weights as named: `equal` is 1 each) against plain "
             f"training: built-in default, quickstart config with `{' '.join(RECIPE)}`, batch {args.batch}, "
             f"packaged chatterbot pairs, {args.steps} steps, "
             f"one CPU process, seeds {', '.join(map(str, args.seeds))} (same data, steps and seed for every arm). "
             "Offline-suite main scores of the first d dimensions, re-normalised (`llmembed.evaluate --dim d`); "
             "each cell is the mean over seeds; `suite mean` is the mean over the tasks, per seed.", "",
             "| width | training | " + " | ".join(SHORT.get(t, t) for t in tasks) + " | suite mean (per seed) | "
             "Matryoshka - plain |", "|---|---|" + "---|" * (len(tasks) + 2)]
    for width in widths:
        plain = [mean_over_tasks("plain", s, width) for s in args.seeds]
        for arm in arms:
            per_seed = [mean_over_tasks(arm, s, width) for s in args.seeds]
            cells = " | ".join(f"{statistics.mean(scores[arm][s][width][t] for s in args.seeds):.4f}" for t in tasks)
            gain = (" / ".join(f"{a - b:+.4f}" for a, b in zip(per_seed, plain)) if arm != "plain" else "")
            lines.append(f"| {width} | {arm} | {cells} | {statistics.mean(per_seed):.4f} "
                         f"({' / '.join(f'{v:.4f}' for v in per_seed)}) | {gain} |")
    plt = write_table(args.out, lines)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [int(w) if w != "full" else max(dims) for w in widths]
    for arm, style in zip(arms, ("o--", "s-", "^-", "v-", "D-")):
        means = [statistics.mean(mean_over_tasks(arm, s, w) for s in args.seeds) for w in widths]
        line, = ax.plot(xs, means, style, label=arm)
        for seed in args.seeds:
            ax.plot(xs, [mean_over_tasks(arm, seed, w) for w in widths], ".", color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(xlabel="embedding width (first d dimensions)", ylabel="offline-suite mean",
           title="Matryoshka vs plain (lines: mean over seeds; dots: seeds)")
    ax.legend()
    save_plot(fig, args.out)


if __name__ == "__main__":
    raise SystemExit(main())

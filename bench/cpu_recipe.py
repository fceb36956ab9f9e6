"""The main job's CPU recipe, one setting at a time, on a dev split of the chatterbot training pairs.

    .venv/bin/python bench/cpu_recipe.py --out runs/recipe --list
    .venv/bin/python bench/cpu_recipe.py --out runs/recipe --variants default causal no-teacher --seeds 42 7

Every variant trains ``launch/configs/pipeline.yaml`` (bidirectional SmolLM2-135M, mean pooling,
LoRA r16, listwise distillation from the packaged all-MiniLM-L6-v2) with its overrides, on the
chatterbot English training pairs outside the dev split, mined the way the pipeline mines them
(all-MiniLM-L6-v2, ranks 3:30, 3 negatives). The dev split is one in five training questions,
cut by a hash (``synthetic_arms.dev_bucket``); the suite's held-out split is never read. With
several ``--seeds`` each seed trains and their linear merge is scored too, at scale 1 and at
``--merge-scale`` (the pipeline's model soup and task-arithmetic scaling). The table goes to
``bench/results/cpu_recipe_runs.md``; ``bench/results/cpu_recipe.md`` explains the choices.
Each step is skipped when its output exists, so a killed run, rerun, continues.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from synthetic_arms import PY, RESULTS, Bench, run, scores_of  # noqa: E402
from train_throughput import write_table  # noqa: E402

# name: (what it changes against the main job's recipe, its overrides of pipeline.yaml)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("the main job's recipe", ()),
    "causal": ("causal attention instead of bidirectional", ("model.backbone.bidirectional=false",)),
    "no-teacher": ("plain InfoNCE: no distillation from all-MiniLM-L6-v2",
                   ("loss.teacher_model=null", "loss.structure_weight=0")),
    "teacher-x1": ("distillation weight 1 instead of 3", ("loss.structure_weight=1",)),
    "teacher-x10": ("distillation weight 10 instead of 3", ("loss.structure_weight=10",)),
    "3-epochs": ("3 epochs instead of 5", ("train.epochs=3",)),
    "temperature-0.02": ("InfoNCE temperature 0.02 instead of 0.05", ("loss.temperature=0.02",)),
    "lr-5e-4": ("learning rate 5e-4 instead of 1e-3", ("train.lr=5.0e-4",)),
    "length-buckets": ("3 length buckets instead of packed rows (the recipe before packing)",
                       ("train.pack_tokens=null", "train.length_buckets=3")),
    "padded": ("padded batches: neither packed nor bucketed", ("train.pack_tokens=null",)),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--merge-scale", type=float, default=1.25)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--master-port", type=int, default=29621, help="the training processes' rendezvous port")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args()
    if args.list:
        for name, (change, overrides) in VARIANTS.items():
            print(f"{name:20s} {change}  {' '.join(overrides)}")
        return 0
    args.epochs = 5  # the main job's; a variant may override it
    bench = Bench(args)
    _, fit, dev = bench.data()
    mined = bench.mine(fit, "recipe-fit")
    teacher = f"loss.teacher_model={bench.embedder}"
    rows: list[str] = []
    for name in args.variants:
        change, overrides = VARIANTS[name]
        recipe = (teacher, *overrides)
        models, train_s = {}, {}
        for seed in args.seeds:
            start = time.perf_counter()
            models[f"seed {seed}"] = bench.train(mined, f"{name}-s{seed}", recipe=recipe, seed=seed)
            # A run whose model was already there is skipped: no time to report.
            elapsed = time.perf_counter() - start
            train_s[f"seed {seed}"] = f"{elapsed:.0f}" if elapsed > 30 else "-"
        if len(args.seeds) > 1:
            for scale in sorted({1.0, args.merge_scale}):
                merged = bench.out / f"merged-{name}-x{scale:g}"
                run([PY, "-m", "llmembed.merge", *models.values(), "--method", "linear", "--scale", str(scale),
                     "--out", merged], merged, bench.log)
                models[f"merge x{scale:g}"] = merged
        for label, model in models.items():
            tag = f"{name}-{label.replace(' ', '')}"
            report = scores_of(bench.evaluate(model, tag, suite=False, data=dev))
            score = next(v for k, v in report.items() if "untrained" not in k)
            rows.append(f"| {name} | {change} | {label} | {next(iter(score.values())):.4f} | "
                        f"{train_s.get(label, '-')} |")
    lines = ["# The CPU recipe, one setting at a time (chatterbot English dev split, nDCG@10)", "",
             f"Command: `.venv/bin/python bench/cpu_recipe.py --out {args.out} --variants {' '.join(args.variants)} "
             f"--seeds {' '.join(map(str, args.seeds))}`; {args.procs} DeepSpeed processes, 2-core CPU.", "",
             "| variant | change | model | dev nDCG@10 | train s |", "|---|---|---|---:|---:|", *rows, ""]
    write_table(RESULTS / "cpu_recipe_runs.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

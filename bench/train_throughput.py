"""Training throughput of the built-in default (SmolLM2-135M + LoRA) on this machine.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--batch-sizes 4 8 16] [--procs 1]

Trains on the packaged chatterbot pairs with the quickstart config and prints one row per
batch size: samples/s and tokens/s (padded tokens processed), and the padding share, measured
after the first two (warm-up) steps. For comparison with sentence-transformers' trainer on the
same model and data, the same table can be produced there with the same batch and lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(batch: int, steps: int, procs: int, data: Path, work: Path, extra: list[str],
        name: str | None = None) -> tuple[list[dict], float]:
    """Train ``steps`` steps; returns the logged rows and the peak RSS (GiB) of the largest process."""
    out = work / (name or f"b{batch}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           str(REPO / "launch" / "train.py")] if procs > 1 else [sys.executable, str(REPO / "launch" / "train.py")]
    cmd += ["--config", str(REPO / "launch" / "configs" / "quickstart.yaml"),
            "--set", f"data.datasets=[{{path: {data}}}]", "--set", f"checkpoint.output_dir={out}",
            "--set", "checkpoint.save_every=0", "--set", f"train.max_steps={steps}",
            "--set", f"train.per_device_batch_size={batch}", "--set", "logging.progress_bar=false", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        # wait4: this child's own peak RSS (the largest of it and the processes it waited for).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            raise SystemExit(f"training failed ({' '.join(cmd)}):\n{stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return rows, usage.ru_maxrss / 2**20  # KiB -> GiB


def write_table(out: Path, lines: list[str]):
    """Write and print a bench's markdown table; returns matplotlib's pyplot for its plot, or
    None (with a message) where matplotlib is not installed (``pip install -e .[bench]``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e .[bench])")
        return None
    return plt


def save_plot(fig, table: Path) -> None:
    """Save a bench's figure as a PNG beside its table."""
    fig.tight_layout()
    fig.savefig(table.with_suffix(".png"), dpi=120)
    print(f"plot: {table.with_suffix('.png')}")


def rates(rows: list[dict]) -> tuple[float, float]:
    """Samples/s and tokens/s between the end of warm-up (step 2) and the last step (the
    logged rates are cumulative since training started)."""
    first, last = rows[1], rows[-1]
    span = last["elapsed_s"] - first["elapsed_s"]
    samples = last["samples_per_s"] * last["elapsed_s"] - first["samples_per_s"] * first["elapsed_s"]
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    return samples / span, tokens / span


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    extra = [x for item in args.set for x in ("--set", item)]
    with tempfile.TemporaryDirectory(prefix="llmembed-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(work / "data")],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"{'batch/device':>12} {'procs':>5} {'steps':>5} {'samples/s':>10} {'tokens/s':>10} {'padding':>8}")
        for batch in args.batch_sizes:
            rows, _ = run(batch, args.steps, args.procs, work / "data" / "train.jsonl", work, extra)
            samples, tokens = rates(rows)
            print(f"{batch:>12} {args.procs:>5} {len(rows):>5} {samples:>10.2f} "
                  f"{tokens:>10.1f} {rows[-1]['padding_share']:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

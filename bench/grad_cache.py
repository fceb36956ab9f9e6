"""GradCache's memory and time against the plain step, as the batch grows at a fixed chunk.

    .venv/bin/python bench/grad_cache.py [--batches 4 32] [--chunk 4] [--steps 4] [--rounds 2]

Trains the quickstart config (the built-in default with LoRA, packaged chatterbot pairs) on one
CPU process for ``--steps`` steps per run, plain and with ``loss.grad_cache_chunk``, at each
batch size. Runs are interleaved (plain, cached, plain, cached, ...) so machine noise hits
both. Reports each run's peak RSS (the training process, from ``wait4``) and samples/s after
the first two steps, and writes a markdown table (``--out``, default
``bench/results/grad_cache.md``) and, with matplotlib installed, a plot beside it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, rates, run, save_plot, write_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "grad_cache.md")
    args = parser.parse_args()
    modes = {"plain": [], f"GradCache chunk {args.chunk}": ["--set", f"loss.grad_cache_chunk={args.chunk}"]}
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="llmembed-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(work / "data")],
                       check=True, stdout=subprocess.DEVNULL)
        for round_ in range(args.rounds):
            for batch in args.batches:
                for mode, extra in modes.items():
                    name = f"r{round_}-b{batch}-{'cached' if extra else 'plain'}"
                    rows, peak = run(batch, args.steps, 1, work / "data" / "train.jsonl", work, extra, name)
                    samples, _ = rates(rows)
                    results.setdefault((batch, mode), []).append((samples, peak))
                    print(f"round {round_ + 1}: batch {batch:>3} {mode:<18} {samples:6.2f} samples/s "
                          f"peak RSS {peak:5.2f} GiB", flush=True)
    lines = [f"GradCache (chunk {args.chunk}) against the plain step: built-in default + LoRA r8 (quickstart "
             f"config), 1 CPU process, {args.steps} steps per run, rates after step 2, {args.rounds} interleaved "
             "rounds (each value listed).", "",
             "| batch | step | samples/s | peak RSS GiB | time per sample vs plain |", "|---|---|---|---|---|"]
    for batch in args.batches:
        plain = statistics.mean(s for s, _ in results[(batch, "plain")])
        for mode in modes:
            values = results[(batch, mode)]
            speed = statistics.mean(s for s, _ in values)
            lines.append(f"| {batch} | {mode} | {' / '.join(f'{s:.2f}' for s, _ in values)} | "
                         f"{max(p for _, p in values):.2f} | {plain / speed:.2f}x |")
    first, last = args.batches[0], args.batches[-1]
    for mode in modes if last != first else ():  # growth needs two batch sizes
        growth = max(p for _, p in results[(last, mode)]) / max(p for _, p in results[(first, mode)])
        lines.append(f"\n{mode}: peak RSS at batch {last} is {growth:.2f}x that at batch {first}.")
    plt = write_table(args.out, lines)
    if plt is None:
        return 0
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode in modes:
        memory.plot(args.batches, [max(p for _, p in results[(b, mode)]) for b in args.batches], "o-", label=mode)
        speed.plot(args.batches, [statistics.mean(s for s, _ in results[(b, mode)]) for b in args.batches], "o-",
                   label=mode)
    memory.set(xlabel="batch (queries)", ylabel="peak RSS (GiB)", xscale="log", title="memory")
    speed.set(xlabel="batch (queries)", ylabel="samples/s", xscale="log", title="speed")
    memory.legend()
    save_plot(fig, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

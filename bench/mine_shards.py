"""Mining's corpus encoding on one process against several launched like training.

    .venv/bin/python bench/mine_shards.py [--texts 8192] [--procs 1 2] [--rounds 2] [--model FOLDER]
                                          [--out bench/results/mine_shards.md]

A generated corpus of ``--texts`` 50-word passages and 256 records whose positives are in it;
``llmembed.mine`` with the packaged all-MiniLM-L6-v2 (or ``--model``), chunks of 512 texts. One
process runs as ``python -m llmembed.mine`` (torch's threads on every core); N processes as
``torchrun --nproc_per_node N -m llmembed.mine`` (one thread each, torchrun's default). Each run
starts from an empty cache and is run again on its full cache; the second run's wall time (start,
loading, search, writing) is taken from the first's, leaving the encoding: texts/s is what the
corpus and the queries took to encode. Rounds are interleaved so machine noise hits every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from data_scale import WORDS  # noqa: E402
from train_throughput import write_table  # noqa: E402


def write_inputs(folder: Path, texts: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    passages = [" ".join(rng.choice(WORDS) for _ in range(50)) + f" {n}" for n in range(texts)]
    corpus, records = folder / "corpus.jsonl", folder / "records.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    records.write_text("".join(json.dumps({"query": " ".join(passages[i].split()[:8]), "positive": passages[i]}) + "\n"
                               for i in range(0, texts, max(1, texts // 256))))
    return corpus, records


def timed(procs: int, model: str, corpus: Path, records: Path, out: Path) -> tuple[float, str]:
    args = ["-m", "llmembed.mine", "--model", model, "--input", str(records), "--corpus", str(corpus),
            "--out", str(out), "--ranks", "3:30", "--num-negatives", "3", "--chunk-size", "512", "--no-progress",
            "--overwrite"]
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    start = time.perf_counter()
    run = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - start, run.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=8192)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mine_shards.md")
    args = parser.parse_args()
    from llmembed.serve.encoders import reference_model_dir

    model = args.model or str(reference_model_dir())
    model_name = Path(args.model).name if args.model else "all-MiniLM-L6-v2 (packaged)"
    rates: dict[int, list[float]] = {p: [] for p in args.procs}
    with tempfile.TemporaryDirectory(prefix="llmembed-bench-") as tmp:
        work = Path(tmp)
        corpus, records = write_inputs(work, args.texts)
        encoded_texts = None
        for round_ in range(args.rounds):
            for procs in args.procs:
                out = work / f"mined-{procs}.jsonl"
                shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
                cold, _ = timed(procs, model, corpus, records, out)
                warm, stdout = timed(procs, model, corpus, records, out)
                stats = json.loads(out.with_name(out.name + ".stats.json").read_text())
                encoded_texts = stats["texts_from_cache"]
                assert stats["texts_encoded"] == 0, "the rerun encoded again"
                rates[procs].append(encoded_texts / (cold - warm))
                print(f"round {round_ + 1}: {procs} process(es): cold {cold:.1f} s, cached {warm:.1f} s, "
                      f"{rates[procs][-1]:.0f} texts/s", flush=True)
    base = statistics.mean(rates[args.procs[0]])
    lines = [f"Mining's encoding, corpus of {args.texts:,} generated 50-word passages plus "
             f"{encoded_texts - args.texts} queries ({encoded_texts:,} texts), "
             f"{model_name}, chunks of 512, 2-core CPU (`.venv/bin/python bench/mine_shards.py`); texts/s = "
             "texts / (wall time from an empty cache - wall time of the same command on its full cache); "
             f"{args.rounds} interleaved rounds, each value listed.", "",
             "| processes | launch | texts/s | vs 1 process |", "|---|---|---|---|"]
    for procs in args.procs:
        launch = "python -m llmembed.mine" if procs == 1 else f"torchrun --nproc_per_node {procs} -m llmembed.mine"
        lines.append(f"| {procs} | `{launch}` | {' / '.join(f'{r:.0f}' for r in rates[procs])} | "
                     f"{statistics.mean(rates[procs]) / base:.2f}x |")
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

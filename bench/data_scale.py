"""What a training rank pays to hold its data, as the data grows: time and resident memory.

    .venv/bin/python bench/data_scale.py [--sizes 100000 1000000 5000000] [--work DIR]
                                         [--reader-up-to 1000000] [--out bench/results/data_scale.md]

Generates ``--sizes`` records shaped like E5-mistral's training pairs (a 10-word query, a
50-word positive and three 50-word hard negatives; about 1.5 KB of JSONL each), kept in
``--work`` between runs, and measures each way of loading them in a fresh process:

- **today's reader** (before the store): every record read into Python objects
  (``read_jsonl``), then the token-length pass that length grouping runs at every start;
- **store, cold**: the trainer's ``load_datasets`` on a file never seen, parsing it into the
  memory-mapped Arrow cache, plus its token lengths (counted once, kept beside it);
- **store, warm**: the same on the next start, which maps what the cold start wrote.

Each store run goes on to build the batch sampler (length-grouped, batch 32) and draw 100
batches of records, so memory that training needs beyond loading is counted too. Time is
from the call to ready, in-process (Python's start and imports excluded). Memory is the
process's private resident memory (``RssAnon``) grown since before the call: what each rank
holds on its own. Pages of the mapped table that a rank touched (``RssFile``) are listed
apart: they live once in the page cache, shared by every rank of the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import write_table  # noqa: E402
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


def memory() -> dict[str, float]:
    """This process's resident memory in MiB: private (RssAnon) and file-backed (RssFile)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def generate(path: Path, count: int) -> None:
    """``count`` records, the same for a given count (seeded); texts drawn from a pool of
    sentences with the record's number appended, so every text is distinct."""
    if path.is_file() and sum(1 for _ in open(path, "rb")) == count:
        return
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(49)) for _ in range(2000)]
    queries = [" ".join(rng.choice(WORDS) for _ in range(9)) for _ in range(2000)]
    partial = path.with_suffix(".partial")
    with open(partial, "w") as out:
        for n in range(count):
            pick = rng.randrange
            out.write(json.dumps({"query": f"{queries[pick(2000)]} {n}", "positive": f"{sentences[pick(2000)]} {n}",
                                  "negatives": [f"{sentences[pick(2000)]} {n}" for _ in range(3)]}) + "\n")
    partial.replace(path)


def measure(mode: str, data: Path) -> dict:
    """One way of loading ``data``, in this (fresh) process."""
    import numpy as np
    from transformers import AutoTokenizer

    from llmembed.resolve import default_backbone_dir
    from llmembed.serving import ServingContract
    from llmembed.tokenization import EmbeddingTokenizer

    tokenizer = EmbeddingTokenizer(AutoTokenizer.from_pretrained(default_backbone_dir()), ServingContract())
    if mode == "reader":
        from llmembed.data.readers import read_jsonl
        from llmembed.data.sampling import record_lengths

        before = memory()
        start = time.perf_counter()
        records = read_jsonl(data)
        loaded = time.perf_counter() - start
        lengths = record_lengths(records, tokenizer.count_tokens)
        total = time.perf_counter() - start
        after = memory()
        return {"records": len(records), "load_s": loaded, "lengths_s": total - loaded, "total_s": total,
                "anon_mib": after["RssAnon"] - before["RssAnon"], "file_mib": after["RssFile"] - before["RssFile"],
                "rows": int(lengths.shape[0])}
    from llmembed.config import from_dict
    from llmembed.data.sampling import HomogeneousBatchSampler
    from llmembed.train.config import TrainConfig
    from llmembed.train.setup import grouping_lengths, load_datasets

    config = from_dict(TrainConfig, {"data": {"datasets": [{"path": str(data)}], "group_by_length": True}})
    before = memory()
    start = time.perf_counter()
    datasets, _ = load_datasets(config, skip_invalid=False)
    loaded = time.perf_counter() - start
    lengths = grouping_lengths(datasets, tokenizer, config)
    sampler = HomogeneousBatchSampler([len(d.records) for d in datasets], [1.0], 32, lengths=lengths)
    batches = sampler.batches()
    first = next(batches)
    ready = time.perf_counter() - start
    drawn = [datasets[first.dataset].records[i] for i in first.indices]
    for _ in range(99):
        ref = next(batches)
        drawn = [datasets[ref.dataset].records[i] for i in ref.indices]
    after = memory()
    return {"records": len(datasets[0].records), "load_s": loaded, "lengths_s": ready - loaded, "total_s": ready,
            "anon_mib": after["RssAnon"] - before["RssAnon"], "file_mib": after["RssFile"] - before["RssFile"],
            "rows": int(np.asarray(lengths[0]).shape[0]), "batch": len(drawn)}


def run(mode: str, data: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--data", str(data)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmembed-data-scale"))
    parser.add_argument("--reader-up-to", type=int, default=1_000_000,
                        help="run today's reader only up to this many records (it needs ~2 KB per record)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_scale.md")
    parser.add_argument("--measure", choices=["reader", "cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.data)))
        return 0
    import shutil

    from llmembed.data.store import CACHE_FOLDER

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        data = args.work / f"records-{size}.jsonl"
        generate(data, size)
        shutil.rmtree(args.work / CACHE_FOLDER, ignore_errors=True)
        modes = (["reader"] if size <= args.reader_up_to else []) + ["cold", "warm"]
        for mode in modes:
            result = run(mode, data)
            rows.append((size, mode, result, data.stat().st_size))
            print(f"{size:>9,} {mode:<6} {json.dumps(result)}", flush=True)
        shutil.rmtree(args.work / CACHE_FOLDER, ignore_errors=True)
    names = {"reader": "today's reader (read_jsonl + lengths)", "cold": "store, cold (parse + lengths)",
             "warm": "store, warm"}
    lines = ["Loading a training dataset, per rank, by size (`.venv/bin/python bench/data_scale.py --sizes "
             f"{' '.join(map(str, args.sizes))}`): records of a 10-word query, a 50-word positive and three 50-word "
             "negatives; token lengths with the default model's tokenizer; the store runs also build the "
             "length-grouped sampler and draw 100 batches of 32 records. Private MiB: resident memory this rank "
             "holds alone (RssAnon growth); mapped MiB: pages of the memory-mapped table it touched (RssFile "
             "growth, shared through the page cache).", "",
             "| records | JSONL MB | path | load s | lengths s | ready s | private MiB | private MiB per 1M | "
             "mapped MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for size, mode, r, nbytes in rows:
        lines.append(f"| {size:,} | {nbytes / 1e6:,.0f} | {names[mode]} | {r['load_s']:.1f} | {r['lengths_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['anon_mib']:,.0f} | {r['anon_mib'] / size * 1e6:,.0f} | "
                     f"{r['file_mib']:,.0f} |")
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Hard negatives for a training file, mined by the teacher with the positive-aware rule and,
with ``--cross-encoder``, re-scored by a reranker (``llmembed.mine``)."""

from __future__ import annotations

from pathlib import Path

from llmembed.outputs import write_text
from launch.stages.runner import PY, Job, Stage, count_records


def mine(job: Job, records: Path, name: str, teacher: str) -> Path:
    """``records`` with mined negatives (as they are when too few to mine from each other)."""
    opts = job.settings
    mined = job.data / f"{name}_mined.jsonl"
    count = count_records(records)
    if count <= int(opts.ranks.split(":")[1]):
        print(f"[pipeline] mine_{name}: {count} records, fewer than the rank window; not mined", flush=True)
        write_text(mined, records.read_text(encoding="utf-8"))
        return mined
    reranker = ["--cross-encoder", opts.cross_encoder] if opts.cross_encoder else []
    job.run(Stage(f"mine_{name}", [
        [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(records), "--out", str(mined), "--ranks",
         opts.ranks, "--num-negatives", str(opts.num_negatives), "--no-progress", "--overwrite", *reranker],
    ], inputs=(records, teacher, opts.cross_encoder), outputs=(mined,)))
    return mined

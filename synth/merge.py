"""``python -m synth.merge --out DIR [--into DIR] [--heldout-share 0.05]``

One training set from a synth output written by several processes or nodes
(``--num-shards N --shard-index i``, e.g. a Slurm array): every part's shards in a fixed order,
with exact and near-duplicate removal across all of them (each process could only see its own
part), then a deterministic train/held-out split by a hash of the query. Writes
``train.jsonl``, ``heldout.jsonl`` and ``merge_stats.json`` into ``--into`` (default
``DIR/merged``). Refuses to merge while a part is unfinished, unless ``--allow-partial``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from synth.filters import RecordFilter
from synth.store import atomic_write, jsonl

_SHARD = re.compile(r"part(\d{3})of(\d{3})-(\d{5})\.jsonl$")


def manifests(out: Path) -> dict[str, dict]:
    """Each part's manifest: ``manifest.json`` (one process) or ``manifest.partIIIofNNN.json``."""
    found = {}
    for path in sorted(out.glob("manifest*.json")):
        try:
            found[path.name] = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: unreadable manifest ({err})") from None
    return found


def shard_files(out: Path) -> list[Path]:
    files = [p for p in (out / "shards").glob("*.jsonl") if _SHARD.search(p.name)]
    return sorted(files, key=lambda p: tuple(int(x) for x in _SHARD.search(p.name).groups()))


def check_complete(out: Path) -> None:
    found = manifests(out)
    if not found:
        raise ValueError(f"{out}: no synth manifest; is this a synth --out folder?")
    parts = {m.get("run_key", {}).get("num_shards", 1) for m in found.values()}
    expected = max(parts) if parts else 1
    if len(found) < expected:
        raise ValueError(f"{out}: {len(found)} of {expected} parts have started; run the missing shard indexes "
                         "first or pass --allow-partial")
    unfinished = sorted(name for name, m in found.items() if not m.get("complete"))
    if unfinished:
        raise ValueError(f"{out}: unfinished part(s) {', '.join(unfinished)}; rerun their commands to finish them "
                         "or pass --allow-partial")


def heldout(query: str, share: float) -> bool:
    bucket = int(hashlib.sha256(query.lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < share


def merge(out: Path, into: Path, heldout_share: float = 0.05, allow_partial: bool = False) -> dict:
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: no such folder")
    if not allow_partial:
        check_complete(out)
    files = shard_files(out)
    if not files:
        raise ValueError(f"{out}: no shards to merge")
    filt = RecordFilter()
    rows = {"train": [], "heldout": []}
    rejected: Counter = Counter()
    total = 0
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
            total += 1
            key = f"{path.stem}:{number}"
            reason = filt.check({"query": record["query"], "positive": record["positive"],
                                 "negatives": record.get("negatives") or [], "task": record.get("task")}, key)
            if reason is not None:
                rejected[reason] += 1
                continue
            rows["heldout" if heldout(record["query"], heldout_share) else "train"].append(record)
    into.mkdir(parents=True, exist_ok=True)
    for name, records in rows.items():
        atomic_write(into / f"{name}.jsonl", jsonl(records))
    stats = {"shards": len(files), "records_in": total, "train": len(rows["train"]), "heldout": len(rows["heldout"]),
             "removed": dict(rejected)}
    atomic_write(into / "merge_stats.json", json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> int:
    from llmembed.argtypes import float_in

    parser = argparse.ArgumentParser(prog="python -m synth.merge", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True, help="the synth --out folder every part wrote into")
    parser.add_argument("--into", help="where to write the merged set (default: OUT/merged)")
    parser.add_argument("--heldout-share", type=float_in(0.0, 0.5), default=0.05)
    parser.add_argument("--allow-partial", action="store_true", help="merge what is finished so far")
    args = parser.parse_args(argv)
    out = Path(args.out)
    into = Path(args.into) if args.into else out / "merged"
    try:
        stats = merge(out, into, args.heldout_share, args.allow_partial)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {stats['shards']} shards: {stats['records_in']} records -> {stats['train']} train, "
          f"{stats['heldout']} held out, removed {stats['removed']} -> {into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

from llmembed.argtypes import float_in
from llmembed.data.readers import json_lines
from llmembed.data.schema import DataError, parse_record
from llmembed.outputs import Kind, check_output, folder_with, staged_folder
from synth.filters import RecordFilter
from synth.store import jsonl

_SHARD = re.compile(r"part(\d{3})of(\d{3})-(\d{5})\.jsonl$")


def manifests(out: Path) -> dict[str, dict]:
    """Each part's manifest: ``manifest.json`` (one process) or ``manifest.partIIIofNNN.json``."""
    found = {}
    for path in sorted(out.glob("manifest*.json")):
        try:
            manifest = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: unreadable manifest ({err})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("run_key"), dict):
            raise ValueError(f"{path}: not a synth manifest (no run_key)")
        found[path.name] = manifest
    return found


def _part(manifest: dict) -> tuple[int, int]:
    key = manifest["run_key"]
    return int(key.get("shard_index", 0)), int(key.get("num_shards", 1))


def shard_files(out: Path) -> list[Path]:
    files = [p for p in (out / "shards").glob("*.jsonl") if _SHARD.search(p.name)]
    return sorted(files, key=lambda p: tuple(int(x) for x in _SHARD.search(p.name).groups()))


def check_one_run(out: Path, allow_partial: bool) -> list[Path]:
    """The shards of one run, all its parts present (and finished, unless ``allow_partial``):
    parts of other runs (another model, seed, temperature...) or of another shard count are
    refused, naming what differs or is missing. Returns the shard files to merge."""
    found = manifests(out)
    if not found:
        raise ValueError(f"{out}: no synth manifest; is this a synth --out folder?")
    first_name, first = next(iter(found.items()))

    def settings(manifest: dict) -> dict:
        return {k: v for k, v in manifest["run_key"].items() if k != "shard_index"}

    for name, manifest in found.items():
        if settings(manifest) != settings(first):
            changed = sorted(k for k in set(settings(manifest)) | set(settings(first))
                             if settings(manifest).get(k) != settings(first).get(k))
            raise ValueError(f"{out / name}: a run with other settings than {first_name} ({', '.join(changed)}); "
                             "merge the parts of one run only")
    num_shards = _part(first)[1]
    parts = {_part(m)[0]: name for name, m in found.items()}
    missing = [f"part{i:03d}of{num_shards:03d}" for i in range(num_shards) if i not in parts]
    if missing and not allow_partial:
        raise ValueError(f"{out}: {len(parts)} of {num_shards} parts have started, missing {', '.join(missing)}; "
                         "run their shard indexes first or pass --allow-partial")
    unfinished = sorted(name for name, m in found.items() if not m.get("complete"))
    if unfinished and not allow_partial:
        raise ValueError(f"{out}: unfinished part(s) {', '.join(unfinished)}; rerun their commands to finish them "
                         "or pass --allow-partial")
    files = shard_files(out)
    for path in files:
        index, total = (int(x) for x in _SHARD.search(path.name).groups()[:2])
        if total != num_shards or index not in parts:
            raise ValueError(f"{path}: a shard of no run in {out} (its manifests describe a {num_shards}-part run"
                             f"{'' if total == num_shards else f', this shard a {total}-part one'}); "
                             "remove it or merge it separately")
    return files


def heldout(query: str, share: float) -> bool:
    bucket = int(hashlib.sha256(query.lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < share


MERGED_KIND = Kind("a merged synth set (no merge_stats.json)", folder=True, recognise=folder_with("merge_stats.json"))


def merge(out: Path, into: Path, heldout_share: float = 0.05, allow_partial: bool = False,
          overwrite: bool = False) -> dict:
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: no such folder")
    files = check_one_run(out, allow_partial)
    inputs = [out / "shards", *(out / name for name in manifests(out))]
    check_output(into, inputs=inputs, kind=MERGED_KIND, overwrite=overwrite, flag="--into")
    if not files:
        raise ValueError(f"{out}: no shards to merge")
    filt = RecordFilter()
    rows = {"train": [], "heldout": []}
    rejected: Counter = Counter()
    total = 0
    for path in files:
        for number, record in json_lines(path):
            try:
                parse_record(record, ignore_unknown_keys=True)
            except (ValueError, DataError) as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            total += 1
            key = f"{path.stem}:{number}"
            reason = filt.check({"query": record["query"], "positive": record["positive"],
                                 "negatives": record.get("negatives") or [], "task": record.get("task")}, key)
            if reason is not None:
                rejected[reason] += 1
                continue
            rows["heldout" if heldout(record["query"], heldout_share) else "train"].append(record)
    stats = {"shards": len(files), "records_in": total, "train": len(rows["train"]), "heldout": len(rows["heldout"]),
             "removed": dict(rejected)}
    with staged_folder(into) as staging:
        for name, records in rows.items():
            (staging / f"{name}.jsonl").write_text(jsonl(records), encoding="utf-8")
        (staging / "merge_stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synth.merge", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True, help="the synth --out folder every part wrote into")
    parser.add_argument("--into", help="where to write the merged set (default: OUT/merged)")
    parser.add_argument("--heldout-share", type=float_in(0.0, 0.5), default=0.05)
    parser.add_argument("--allow-partial", action="store_true", help="merge what is finished so far")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier merge in --into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    into = Path(args.into) if args.into else out / "merged"
    try:
        stats = merge(out, into, args.heldout_share, args.allow_partial, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {stats['shards']} shards: {stats['records_in']} records -> {stats['train']} train, "
          f"{stats['heldout']} held out, removed {stats['removed']} -> {into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Resumable output: finished shards are written once, atomically, and never rewritten.

Layout under ``--out``::

    brainstorm.json            task definitions from the brainstorm step (per category)
    shards/<part>-00000.jsonl  training records (the trainer's schema)
    raw/<part>-00000.jsonl     every generation of that shard, accepted or not, for audit
    stats/<part>-00000.json    the shard's counts (categories, languages, rejections, tokens)
    manifest.json              settings and the totals over all finished shards

A shard's records, raw file and stats are renamed into place before the next shard starts;
the stats file goes last and marks the shard as done, so a kill at any moment leaves either a
finished shard or nothing of it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from llmembed.outputs import write_text


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class ShardStore:
    def __init__(self, out: str | Path, part: str) -> None:
        self.out = Path(out)
        self.part = part
        for sub in ("shards", "raw", "stats"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def name(self, index: int) -> str:
        return f"{self.part}-{index:05d}"

    def done(self, index: int) -> bool:
        return (self.out / "stats" / f"{self.name(index)}.json").is_file()

    def write(self, index: int, records: list[dict], raw: list[dict], stats: dict) -> None:
        if self.done(index):
            raise RuntimeError(f"shard {self.name(index)} is finished and is never rewritten")
        name = self.name(index)
        atomic_write(self.out / "shards" / f"{name}.jsonl", jsonl(records))
        atomic_write(self.out / "raw" / f"{name}.jsonl", jsonl(raw))
        atomic_write(self.out / "stats" / f"{name}.json", json.dumps(stats, indent=2))

    def records(self, index: int) -> list[dict]:
        path = self.out / "shards" / f"{self.name(index)}.jsonl"
        return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l]

    def all_stats(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "stats").glob(f"{self.part}-*.json"))]


def merge_stats(parts: list[dict]) -> dict:
    total: dict = {"generated": 0, "accepted": 0, "rejected": 0, "tokens_in": 0, "tokens_out": 0,
                   "attempts": 0, "wall_time_s": 0.0}
    counters = {k: Counter() for k in ("accepted_by_category", "generated_by_category", "accepted_by_language",
                                       "rejected_by_reason")}
    for s in parts:
        for key in total:
            total[key] += s.get(key, 0)
        for key, counter in counters.items():
            counter.update(s.get(key, {}))
    total.update({k: dict(sorted(v.items())) for k, v in counters.items()})
    total["wall_time_s"] = round(total["wall_time_s"], 2)
    return total

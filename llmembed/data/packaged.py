"""Real labelled data that ships inside PyPI packages, converted to the record schema.

No download at run time: ``chatterbot-corpus`` carries question/answer YAML files (English:
~2,000 pairs over 21 topics). ``python -m llmembed.data.packaged chatterbot --out DIR``
writes ``train.jsonl`` and ``heldout.jsonl`` (a deterministic split by question).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import yaml

from llmembed.argtypes import float_in

INSTRUCTION = "Given a question, retrieve the answer to it"


def chatterbot_dir(language: str = "english") -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("needs the PyPI package 'chatterbot-corpus': pip install --no-deps chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / language


def chatterbot_pairs(language: str = "english", exclude: tuple[str, ...] = ("tech_support",)) -> list[dict]:
    """(question, answer) records; each question once (first answer wins), answers unique."""
    records, seen_q, seen_a = [], set(), set()
    for path in sorted(chatterbot_dir(language).glob("*.yml")):
        if path.stem in exclude:
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for convo in data.get("conversations", []):
            if not isinstance(convo, list) or len(convo) < 2:
                continue
            question, answer = (str(x).strip() for x in convo[:2])
            key_q, key_a = question.lower(), answer.lower()
            if len(question) < 4 or len(answer) < 4 or key_q in seen_q or key_a in seen_a:
                continue
            seen_q.add(key_q)
            seen_a.add(key_a)
            records.append({"query": question, "positive": answer, "negatives": [], "instruction": INSTRUCTION,
                            "task": f"chatterbot/{path.stem}", "score": None, "meta": {"source": path.name}})
    return records


def split(records: list[dict], heldout_share: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of the question."""
    train, heldout = [], []
    for r in records:
        bucket = int(hashlib.sha256(r["query"].lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (heldout if bucket < heldout_share else train).append(r)
    return train, heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.data.packaged", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=["chatterbot"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--language", default="english")
    parser.add_argument("--heldout-share", type=float_in(0.0, 0.9, low_open=True), default=0.2)
    args = parser.parse_args(argv)
    try:
        folder = chatterbot_dir(args.language)
        if not folder.is_dir():
            raise RuntimeError(f"--language {args.language}: chatterbot-corpus has no such language "
                               f"({', '.join(sorted(p.name for p in folder.parent.iterdir() if p.is_dir()))})")
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split(chatterbot_pairs(args.language), args.heldout_share)
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} training and {len(heldout)} held-out pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

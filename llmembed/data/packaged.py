"""Real data that ships inside PyPI packages, converted to the record schema.

No download at run time: ``chatterbot-corpus`` carries question/answer YAML files (English:
~2,000 pairs over 21 topics). ``python -m llmembed.data.packaged chatterbot --out DIR``
writes ``train.jsonl`` and ``heldout.jsonl`` (a deterministic split by question).

Unlabelled text for unsupervised stages (SimCSE, MNTP): gensim's test data holds a shortened
English Wikipedia dump (206 articles); ``python -m llmembed.data.packaged wiki --out DIR``
writes its prose sentences as ``{"text": ...}`` records to ``sentences.jsonl``.
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
from llmembed.outputs import Kind, OutputError, check_output, folder_with, staged_folder

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


WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Prose sentences of the Wikipedia excerpt in gensim's test data, in article order, each
    once: wiki markup stripped by gensim's own parser, lists, tables and headings left out."""
    import bz2
    import re

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("needs the PyPI package 'gensim' (its test data holds the Wikipedia excerpt)")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_DUMP
    sentences: dict[str, None] = {}
    with bz2.open(dump) as handle:
        for _, text, _ in extract_pages(handle, filter_namespaces=("0",)):
            for paragraph in filter_wiki(text).split("\n"):
                paragraph = paragraph.replace("'''", "").replace("''", "").strip()
                if len(paragraph) < 2 * min_chars or paragraph.startswith(("*", "|", "{", "!", "=", "#", ":")):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
                    if min_chars <= len(sentence.strip()) <= max_chars:
                        sentences[sentence.strip()] = None
    return list(sentences)


def split(records: list[dict], heldout_share: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of the question."""
    train, heldout = [], []
    for r in records:
        bucket = int(hashlib.sha256(r["query"].lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (heldout if bucket < heldout_share else train).append(r)
    return train, heldout


MARKER = "packaged.json"  # what was written, and the sign that this tool wrote the folder
PACKAGED_KIND = Kind(f"a folder written by this tool (no {MARKER})", folder=True, recognise=folder_with(MARKER))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.data.packaged", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=["chatterbot", "wiki"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--language", default="english")
    parser.add_argument("--heldout-share", type=float_in(0.0, 0.9, low_open=True), default=0.2)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --out of this tool")
    args = parser.parse_args(argv)
    try:
        out = check_output(args.out, inputs=[], kind=PACKAGED_KIND, overwrite=args.overwrite)
        if args.source == "wiki":
            files = {"sentences": [{"text": text} for text in wikipedia_sentences()]}
        else:
            folder = chatterbot_dir(args.language)
            if not folder.is_dir():
                raise RuntimeError(f"--language {args.language}: chatterbot-corpus has no such language "
                                   f"({', '.join(sorted(p.name for p in folder.parent.iterdir() if p.is_dir()))})")
            train, heldout = split(chatterbot_pairs(args.language), args.heldout_share)
            files = {"train": train, "heldout": heldout}
    except (RuntimeError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with staged_folder(out) as staging:
        for name, rows in files.items():
            with open(staging / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = {name: len(rows) for name, rows in files.items()}
        (staging / MARKER).write_text(json.dumps({"source": args.source, "language": args.language,
                                                  "heldout_share": args.heldout_share, "records": counts}, indent=2))
    print(f"wrote {', '.join(f'{n} {name}' for name, n in counts.items())} records to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

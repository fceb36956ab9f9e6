"""Quality filters; every rejection is counted by reason.

Empty or too-short fields, a query copied into its document, a positive equal to a negative,
exact duplicates (normalised hash), near duplicates (MinHash LSH over word shingles, via
datasketch) and optional decontamination against evaluation texts (shared word n-grams).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from pathlib import Path

from llmembed.data.readers import json_lines_with_text
from llmembed.data.schema import DataError
from llmembed.outputs import write_text

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def _tokens(text: str) -> list[str]:
    words = normalise(text).split()
    # Scripts without spaces (Chinese, Japanese): fall back to characters.
    if len(words) <= 2 and len(text) > 12:
        return [c for c in normalise(text) if not c.isspace()]
    return words


def shingles(text: str, n: int = 3) -> set[str]:
    tokens = _tokens(text)
    if len(tokens) < n:
        return {" ".join(tokens)}
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class RecordFilter:
    def __init__(self, min_query_chars: int = 3, min_passage_chars: int = 2, near_dup_threshold: float = 0.85,
                 num_perm: int = 64, decontaminate: str | Path | None = None, contamination_ngram: int = 8,
                 seed: int = 1, query_only: bool = False) -> None:
        from datasketch import MinHash, MinHashLSH

        # query_only: duplicates are judged on the query alone (queries written for passages of
        # one corpus: two queries for one long passage share most shingles, two passages asked
        # the same generic question should keep one).
        self.query_only = query_only

        self._MinHash = MinHash
        self.min_query_chars = min_query_chars
        self.min_passage_chars = min_passage_chars
        self.num_perm = num_perm
        self.seed = seed
        self.lsh = MinHashLSH(threshold=near_dup_threshold, num_perm=num_perm)
        self.seen: set[str] = set()
        self.rejected: Counter = Counter()
        self.contamination_ngram = contamination_ngram
        self.eval_ngrams: set[str] = set()
        self.eval_texts: set[str] = set()
        if decontaminate:
            for line in Path(decontaminate).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self.eval_texts.add(normalise(line))
                    self.eval_ngrams |= shingles(line, contamination_ngram)

    def _minhash(self, text: str):
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        for s in shingles(text):
            m.update(s.encode("utf-8"))
        return m

    def check(self, record: dict, key: str) -> str | None:
        """Reason to reject ``record`` (and do not remember it), or None (and remember it)."""
        query, positive, negatives = record["query"], record["positive"], record["negatives"]
        if not query.strip() or not positive.strip() or any(not n.strip() for n in negatives):
            return "empty_field"
        if len(query.strip()) < self.min_query_chars or len(positive.strip()) < self.min_passage_chars:
            return "too_short"
        nq, np_ = normalise(query), normalise(positive)
        if record["task"] != "long_short" and (nq == np_ or (len(nq) >= 20 and nq in np_)):
            return "query_copied_into_document"
        if any(normalise(n) == np_ for n in negatives):
            return "positive_equals_negative"
        if self.eval_texts or self.eval_ngrams:
            for text in (query, positive, *negatives):
                if normalise(text) in self.eval_texts or shingles(text, self.contamination_ngram) & self.eval_ngrams:
                    return "contaminated"
        digest = self._digest(nq, np_)
        if digest in self.seen:
            return "duplicate"
        signature = self._minhash(self._text(query, positive))
        if self.lsh.query(signature):
            return "near_duplicate"
        self.seen.add(digest)
        self.lsh.insert(key, signature)
        return None

    def remember(self, record: dict, key: str) -> None:
        """Add an already accepted record (from a finished shard) to the duplicate indexes."""
        self.seen.add(self._digest(normalise(record["query"]), normalise(record["positive"])))
        self.lsh.insert(key, self._minhash(self._text(record["query"], record["positive"])))

    def _digest(self, query: str, positive: str) -> str:
        return hashlib.sha256((query if self.query_only else f"{query}\x00{positive}").encode()).hexdigest()

    def _text(self, query: str, positive: str) -> str:
        return query if self.query_only else f"{query} {positive}"


_LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)


def text_check(query: str, positive: str) -> str | None:
    """Why a pair fails the cheap text checks that run before any teacher, or None: enough
    length and letters, mostly distinct words, query and positive not the same text. These
    catch what a small generator writes when it fails ("boolean" / "true", arithmetic, one word
    repeated)."""
    query = query.strip()
    words = positive.split()
    if len(query) < 8 or len(positive) < 20:
        return "too_short"
    if sum(1 for c in query + positive if _LETTERS.match(c)) < 0.6 * len(query + positive):
        return "few_letters"
    if len(words) >= 8 and len(set(words)) < 0.4 * len(words):
        return "repetitive"
    if query.lower() == positive.strip().lower():
        return "query_equals_positive"
    return None


def text_check_file(source: Path, target: Path) -> Counter:
    """Copy the records of ``source`` that pass :func:`text_check` (on the query and the first
    positive) to ``target``, line for line; returns the rejections by reason."""
    kept, dropped = [], Counter()
    for number, line, record in json_lines_with_text(source):
        if not isinstance(record, dict) or not isinstance(record.get("query"), str) or "positive" not in record:
            raise DataError(f"{source}:{number}: field 'query': expected a record with a query and a positive")
        positive = record["positive"] if isinstance(record["positive"], str) else record["positive"][0]
        reason = text_check(record["query"], positive)
        if reason is None:
            kept.append(line)  # the line as written: the filter copies, it does not rewrite
        else:
            dropped[reason] += 1
    write_text(target, "".join(line + "\n" for line in kept))
    print(f"text checks: kept {len(kept)}, dropped {dict(dropped)}")
    return dropped

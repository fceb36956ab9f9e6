"""The one record schema that flows through synth, mining and training.

Canonical form (one JSON object per line)::

    {"query": str, "positive": str | [str], "negatives": [str], "instruction": str | null,
     "task": str, "score": float | null, "meta": {...}}

Also accepted, because public datasets ship them: ``anchor/positive/negative`` (negative a
string or a list) and ``query/pos/neg`` (lists). Unlabelled text for unsupervised stages
(SimCSE) is ``{"text": str}``: a record whose query and only positive are that text (see
:func:`is_plain_text`). Every problem is reported with the field name; readers add the file
and line.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any


class DataError(ValueError):
    """A record is invalid. ``str(err)`` reads ``file:line: field 'x': what is wrong``."""


@dataclass
class Record:
    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None
    task: str | None = None
    score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Read from a {"text": ...} line (query and only positive are that text), as opposed to a
    # labelled pair that happens to repeat its query: the file's layout decides, not the values.
    plain_text: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.plain_text:
            return {"text": self.query, "meta": self.meta}
        return {
            "query": self.query,
            "positive": self.positives[0] if len(self.positives) == 1 else list(self.positives),
            "negatives": list(self.negatives),
            "instruction": self.instruction,
            "task": self.task,
            "score": self.score,
            "meta": self.meta,
        }


_LAYOUTS = (
    # (query key, positive key, negative key)
    ("query", "positive", "negatives"),
    ("anchor", "positive", "negative"),
    ("query", "pos", "neg"),
)
# Keys every layout accepts besides its own three.
_COMMON = ("instruction", "task", "score", "meta", "id", "_id")
# Misspellings seen in public datasets, mapped to the canonical layout's key.
_ALIASES = {"negative": "negatives", "neg": "negatives", "negs": "negatives", "hard_negatives": "negatives",
            "hard_negative": "negatives", "pos": "positive", "positives": "positive", "anchor": "query",
            "question": "query", "instructions": "instruction"}


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"field '{name}': empty text")
    return value


def _texts(value: Any, name: str, allow_empty: bool) -> list[str]:
    if value is None:
        value = []
    if isinstance(value, str):
        return [_text(value, name)]
    if not isinstance(value, list):
        raise DataError(f"field '{name}': expected a string or a list of strings, got {type(value).__name__}")
    out = [_text(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if not out and not allow_empty:
        raise DataError(f"field '{name}': empty list")
    return out


def _check_keys(obj: dict, layout: tuple[str, ...]) -> None:
    """A key the layout does not read would be lost without a word (``negative`` beside
    ``query``/``positive`` drops every hard negative): name it, with the likely intended key."""
    allowed = set(layout) | set(_COMMON)
    for key in sorted(set(obj) - allowed):
        guess = _ALIASES.get(key) if _ALIASES.get(key) in allowed else None
        guess = guess or next(iter(difflib.get_close_matches(key, sorted(allowed), n=1)), None)
        hint = f"; did you mean '{guess}'?" if guess else ""
        raise DataError(f"field '{key}': unknown key for the {'/'.join(layout)} layout{hint} "
                        "(data.ignore_unknown_keys: true skips unknown keys)")


@dataclass(frozen=True)
class RecordFacts:
    """What choosing and checking a dataset's loss needs to know of all its records, counted
    once: read from a list here, or kept beside a memory-mapped table (:mod:`llmembed.data.store`)
    so that a million records are not walked again at every start."""

    count: int = 0
    plain_text: int = 0  # read from {"text": ...} lines
    scored: int = 0  # with a score
    with_negatives: int = 0  # with at least one hard negative

    @classmethod
    def of(cls, records: "Iterable[Record]") -> "RecordFacts":
        count = plain = scored = negatives = 0
        for record in records:
            count += 1
            plain += record.plain_text
            scored += record.score is not None
            negatives += bool(record.negatives)
        return cls(count, plain, scored, negatives)

    def add(self, record: Record) -> "RecordFacts":
        return RecordFacts(self.count + 1, self.plain_text + record.plain_text,
                           self.scored + (record.score is not None), self.with_negatives + bool(record.negatives))

    @property
    def all_plain_text(self) -> bool:
        return self.count > 0 and self.plain_text == self.count

    @property
    def all_scored(self) -> bool:
        return self.count > 0 and self.scored == self.count


def is_plain_text(record: Record) -> bool:
    """A record read from a ``{"text": ...}`` line: one text, its own positive, nothing else."""
    return record.plain_text


def parse_record(obj: Any, ignore_unknown_keys: bool = False) -> Record:
    """Validate one decoded JSON value and return a :class:`Record`. Keys the record's layout
    does not read are an error unless ``ignore_unknown_keys``."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and not any(k in obj for k in ("query", "anchor", "positive", "pos")):
        if not ignore_unknown_keys:
            _check_keys(obj, ("text",))
        text = _text(obj["text"], "text")
        return Record(text, [text], meta=_meta(obj), plain_text=True)
    layout = next((l for l in _LAYOUTS if l[0] in obj and l[1] in obj), None)
    if layout is None:
        if "query" not in obj and "anchor" not in obj:
            raise DataError("field 'query': missing")
        raise DataError("field 'positive': missing")
    if not ignore_unknown_keys:
        _check_keys(obj, layout)
    qk, pk, nk = layout
    query = _text(obj[qk], qk)
    positives = _texts(obj[pk], pk, allow_empty=False)
    negatives = _texts(obj.get(nk), nk, allow_empty=True)
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"field 'instruction': expected a string or null, got {type(instruction).__name__}")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"field 'task': expected a string, got {type(task).__name__}")
    score = obj.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"field 'score': expected a finite number or null, got {score!r}")
        score = float(score)
    return Record(query, positives, negatives, instruction or None, task, score, _meta(obj))


def _meta(obj: dict) -> dict:
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"field 'meta': expected an object, got {type(meta).__name__}")
    return meta

"""Strict parsing of generations: JSON only (never ``eval``), the category's keys and types."""

from __future__ import annotations

import json
import re

from synth.prompts import FIELDS

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)

# Instructions attached to symmetric categories (the E5-mistral wording, in our own words).
SYMMETRIC_INSTRUCTIONS = {
    "sts": "Retrieve texts that are semantically similar to the given text",
    "bitext": "Retrieve the translation of the given text",
}


class ParseError(ValueError):
    """Why a generation was rejected; ``reason`` is the short key counted in the manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_object(text: str) -> dict:
    match = _FENCE.match(text)
    if match:  # unconstrained endpoints like to wrap JSON in a code fence
        text = match.group(1)
    try:
        # strict=False admits raw control characters inside strings (grammar engines let them
        # through); they are stripped from the fields below. Still JSON only, never eval.
        obj = json.loads(text, strict=False)
    except json.JSONDecodeError as err:
        raise ParseError("invalid_json", err.msg) from None
    if not isinstance(obj, dict):
        raise ParseError("not_an_object")
    return obj


def parse_tasks(text: str) -> list[str]:
    obj = parse_object(text)
    tasks = obj.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ParseError("wrong_type", "tasks must be a list of strings")
    return [_CONTROL.sub("", t).strip() for t in tasks if _CONTROL.sub("", t).strip()]


def parse_example(text: str, category: str) -> dict[str, str]:
    obj = parse_object(text)
    out = {}
    for name in FIELDS[category]:
        if name not in obj:
            raise ParseError("missing_field", name)
        value = obj[name]
        if not isinstance(value, str):
            raise ParseError("wrong_type", name)
        out[name] = _CONTROL.sub("", value).strip()
    return out


def to_record(category: str, fields: dict[str, str], task: str | None, language: str, meta: dict) -> dict:
    """Map a parsed example to the trainer's record schema."""
    if category == "short_long":
        query, positive, negatives = fields["user_query"], fields["positive_document"], [fields["hard_negative_document"]]
    elif category == "long_short":
        query, positive, negatives = fields["input_text"], fields["label"], [fields["misleading_label"]]
    elif category in ("short_short", "long_long"):
        query, positive, negatives = fields["input"], fields["positive_document"], []
    else:  # sts, bitext
        query, positive, negatives = fields["S1"], fields["S2"], [fields["S3"]]
    instruction = task if task is not None else SYMMETRIC_INSTRUCTIONS.get(category)
    return {"query": query, "positive": positive, "negatives": negatives, "instruction": instruction,
            "task": category, "score": None, "meta": {"language": language, **meta}}

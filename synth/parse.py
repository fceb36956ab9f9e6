"""Strict parsing of generations: JSON only (never ``eval``), validated against the same JSON
schema the request was decoded with, so an unconstrained endpoint meets the same limits
(types, required keys, no extra keys, ``minLength``/``maxLength``) as constrained decoding."""

from __future__ import annotations

import json
import re
from functools import lru_cache

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from synth.prompts import FIELDS, example_schema

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)

# Instructions attached to symmetric categories (the E5-mistral wording, in our own words).
SYMMETRIC_INSTRUCTIONS = {
    "sts": "Retrieve texts that are semantically similar to the given text",
    "bitext": "Retrieve the translation of the given text",
}


# Manifest reason keys for schema violations, by JSON-schema keyword; others: "schema_<keyword>".
SCHEMA_REASONS = {
    "required": "missing_field",
    "type": "wrong_type",
    "maxLength": "field_too_long",
    "minLength": "field_too_short",
    "additionalProperties": "extra_field",
    "maxItems": "too_many_items",
    "minItems": "too_few_items",
}
# Without the request's schema, brainstorm output still has to have this shape.
_TASKS_SHAPE = {"type": "object", "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
                "required": ["tasks"]}


class ParseError(ValueError):
    """Why a generation was rejected; ``reason`` is the short key counted in the manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> Draft202012Validator:
    schema = json.loads(schema_json)
    Draft202012Validator.check_schema(schema)  # a broken schema is our bug, not a bad generation
    return Draft202012Validator(schema)


def validate(obj: object, schema: dict) -> None:
    """Raise ``ParseError`` (reason from ``SCHEMA_REASONS``) unless ``obj`` satisfies ``schema``;
    of several violations the most relevant one (jsonschema's ``best_match``) is reported."""
    error = best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "object"
        raise ParseError(SCHEMA_REASONS.get(error.validator, f"schema_{error.validator}"),
                         f"{where}: {error.message[:120]}")


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


def parse_tasks(text: str, schema: dict | None = None) -> list[str]:
    """Task definitions of a brainstorm generation; ``schema``: the one it was decoded with."""
    obj = parse_object(text)
    validate(obj, schema or _TASKS_SHAPE)
    return [_CONTROL.sub("", t).strip() for t in obj["tasks"] if _CONTROL.sub("", t).strip()]


def parse_example(text: str, category: str, schema: dict | None = None) -> dict[str, str]:
    """The category's fields; ``schema``: the one the request was decoded with (default: the
    category's full-length schema)."""
    obj = parse_object(text)
    validate(obj, schema or example_schema(category))
    return {name: _CONTROL.sub("", obj[name]).strip() for name in FIELDS[category]}


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

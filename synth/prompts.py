"""Prompt templates (files in ``templates/``) and the JSON schema of each category.

Templates put the fixed instructions first and the variable parts last, so vLLM's prefix
caching reuses the shared prefix across requests. String fields carry ``maxLength`` so that
constrained decoding terminates even with a small model.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).with_name("templates")

QUERY_CHARS = 200
DOC_CHARS = 600
TASK_CHARS = 160


def _s(limit: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": limit}


FIELDS: dict[str, dict[str, int]] = {
    "short_long": {"user_query": QUERY_CHARS, "positive_document": DOC_CHARS, "hard_negative_document": DOC_CHARS},
    "long_short": {"input_text": DOC_CHARS, "label": 60, "misleading_label": 60},
    "short_short": {"input": QUERY_CHARS, "positive_document": QUERY_CHARS},
    "long_long": {"input": DOC_CHARS, "positive_document": DOC_CHARS},
    "sts": {"S1": DOC_CHARS, "S2": DOC_CHARS, "S3": DOC_CHARS},
    "bitext": {"S1": DOC_CHARS, "S2": DOC_CHARS, "S3": DOC_CHARS},
}


def example_schema(category: str, max_chars: int | None = None) -> dict:
    """JSON schema of a category; ``max_chars`` caps every string field (small models, tests)."""
    fields = FIELDS[category]
    return {
        "type": "object",
        "properties": {name: _s(min(limit, max_chars or limit)) for name, limit in fields.items()},
        "required": list(fields),
        "additionalProperties": False,
    }


def brainstorm_schema(count: int, max_chars: int | None = None) -> dict:
    return {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": _s(min(TASK_CHARS, max_chars or TASK_CHARS)),
                                 "minItems": 1, "maxItems": count}},
        "required": ["tasks"],
        "additionalProperties": False,
    }


@lru_cache(maxsize=None)
def template(name: str) -> str:
    path = TEMPLATE_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt template {path}")
    return path.read_text(encoding="utf-8").strip()


def render(name: str, **values) -> list[dict]:
    """Chat messages for template ``name`` filled with ``values``."""
    return [{"role": "user", "content": template(name).format(**values)}]


def template_hashes() -> dict[str, str]:
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(TEMPLATE_DIR.glob("*.txt"))}

"""Instruction templates.

Queries are written as ``Instruct: {instruction}\\nQuery: {text}`` by default (E5-mistral);
passages get no prompt unless ``passage_template`` says otherwise. Every template must end
with ``{text}``: the part before it is a *prefix*, which is exactly what sentence-transformers'
prompts and vLLM's plain-text input can reproduce, so training, our ``encode`` and every
server see byte-identical strings.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class PromptError(ValueError):
    """A template is malformed; the message names the field."""


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass
class PromptConfig:
    """Templates for the two sides of an asymmetric task.

    ``query_template`` must contain ``{instruction}`` and end with ``{text}``.
    ``passage_template`` (optional) must end with ``{text}`` and may not use ``{instruction}``.
    ``default_instruction`` is used by the export for sentence-transformers' ``query`` prompt and
    whenever a query is encoded without an explicit instruction.
    """

    query_template: str = DEFAULT_QUERY_TEMPLATE
    passage_template: str | None = None
    default_instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        _check(self.query_template, "prompts.query_template", allow_instruction=True, need_instruction=True)
        if self.passage_template is not None:
            _check(self.passage_template, "prompts.passage_template", allow_instruction=False, need_instruction=False)

    def query_prefix(self, instruction: str | None = None) -> str:
        instruction = self.default_instruction if instruction is None else instruction
        return self.query_template[: -len("{text}")].format(instruction=instruction)

    def passage_prefix(self) -> str:
        if self.passage_template is None:
            return ""
        return self.passage_template[: -len("{text}")].format()

    def prefix(self, instruction: str | None, is_query: bool) -> str:
        return self.query_prefix(instruction) if is_query else self.passage_prefix()


def _check(template: str, field: str, allow_instruction: bool, need_instruction: bool) -> None:
    try:
        names = _fields(template)
    except ValueError as err:
        raise PromptError(f"{field}: {err} in {template!r}") from err
    if not template.endswith("{text}") or names.count("text") != 1:
        raise PromptError(f"{field} must contain {{text}} exactly once, at the very end: {template!r}")
    unknown = sorted(set(names) - {"text", "instruction"})
    if unknown:
        raise PromptError(f"{field} uses unknown placeholders {unknown}: {template!r}")
    if "instruction" in names and not allow_instruction:
        raise PromptError(f"{field} may not use {{instruction}}: {template!r}")
    if need_instruction and names.count("instruction") != 1:
        raise PromptError(f"{field} must contain {{instruction}} exactly once: {template!r}")

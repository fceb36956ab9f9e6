"""Corpus mode of ``synth.generate``: queries grounded in passages of the user's own corpus.

E5-mistral's scheme asks the LLM to invent both the query and the passage, which needs a strong
generator; a small one writes poor passages. Grounding the query in a real passage (InPars,
Promptagator, Gecko) only asks it to read. Each passage of ``--corpus`` (``{"text"}`` or
``{"id", "text"}`` lines; deduplicated, cut to ``--passage-max-tokens``, optionally sampled)
gets ``--queries-per-passage`` queries of the kinds in ``query_kinds.yaml`` (question, keyword
query, claim, title), each with the taxonomy's length and clarity parameters, written in one of
two prompt forms:

- ``fewshot``: a plain completion prompt (a header, passage/query shots, then the passage and
  the kind's label), which small and base models continue reliably; the task instruction is
  the kind's own. Measured with the default 135M model: asked in chat form for a search
  question it answered or echoed the passage (0 of 6 usable), in this form 5 of 8 were usable.
- ``chat``: a chat prompt for instruct models that writes a task instruction and the query as
  JSON (constrained where the backend supports it).

Each record keeps its seed passage's id, the query kind and its parameters in ``meta``;
``synth.relabel`` then lets the LLM choose the positive among retrieved candidates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from llmembed.data.readers import json_lines
from synth.backends import ChatRequest
from synth.backends.base import BackendError, model_path
from synth.filters import RecordFilter, normalise
from synth.parse import ParseError, parse_object, validate
from synth.pipeline import PASSAGES_FILE, Pipeline, Settings, _rng, _seed
from synth.store import atomic_write, jsonl
from synth.taxonomy import Taxonomy

DEFAULT_QUERY_KINDS = Path(__file__).with_name("query_kinds.yaml")
PROMPT_FORMS = ("fewshot", "chat")
QUERY_CHARS = 200
TASK_CHARS = 160
# Parameters of E5's taxonomy that shape a query (the others describe invented passages).
QUERY_PARAMETERS = ("query_length", "clarity")


@dataclass(frozen=True)
class QueryKind:
    name: str
    label: str
    instruction: str
    describe: str
    must_end: str
    examples: tuple[tuple[str, str], ...]


def load_query_kinds(path: str | Path | None = None) -> dict[str, QueryKind]:
    path = Path(path) if path else DEFAULT_QUERY_KINDS
    if not path.is_file():
        raise FileNotFoundError(f"--query-kinds-file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        kinds = {}
        for name, spec in data["kinds"].items():
            examples = tuple((str(e["passage"]), str(e["query"])) for e in spec["examples"])
            kinds[name] = QueryKind(name, str(spec["label"]), str(spec["instruction"]), str(spec["describe"]),
                                    str(spec.get("must_end", "")), examples)
    except yaml.YAMLError as err:
        raise ValueError(f"--query-kinds-file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--query-kinds-file {path}: expected kinds: {{name: {{label, instruction, describe, "
                         f"examples: [{{passage, query}}]}}}} as in synth/query_kinds.yaml ({type(err).__name__}: "
                         f"{err})") from None
    return kinds


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


def read_passages(path: str | Path) -> list[Passage]:
    """``{"text"}`` or ``{"id", "text"}`` lines; a passage seen before (after normalising case,
    spacing and punctuation) is skipped. Ids default to the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--corpus {path}: no such file")
    passages: list[Passage] = []
    seen_text: set[str] = set()
    seen_id: set[str] = set()
    for number, item in json_lines(path):
        if not isinstance(item, dict) or "text" not in item:
            raise ValueError(f'{path}:{number}: expected {{"text": ...}} or {{"id": ..., "text": ...}}')
        text = item["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: field 'text': expected a non-empty string")
        pid = item.get("id", f"line{number}")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ValueError(f"{path}:{number}: field 'id': expected a string or an integer")
        pid = str(pid)
        if pid in seen_id:
            raise ValueError(f"{path}:{number}: field 'id': {pid!r} appears on an earlier line")
        seen_id.add(pid)
        key = normalise(text)
        if key in seen_text:
            continue
        seen_text.add(key)
        passages.append(Passage(pid, text.strip()))
    if not passages:
        raise ValueError(f"--corpus {path}: no passages")
    return passages


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fewshot_prompt(kind: QueryKind, passage: str, params: dict) -> str:
    """Fixed text first (header and shots), the passage last: a prefix cache reuses the rest."""
    wanted = ", ".join(str(v) for v in params.values())
    lines = [f"Each passage below is followed by {kind.describe}" + (f" ({wanted})." if wanted else ".")]
    for shot_passage, shot_query in kind.examples:
        lines += ["", f"Passage: {shot_passage}", f"{kind.label}: {shot_query}"]
    lines += ["", f"Passage: {passage}", f"{kind.label}:"]
    return "\n".join(lines)


def chat_messages(kind: QueryKind, passage: str, params: dict) -> list[dict]:
    wanted = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in params.items())
    text = (f"You write training data for a text retrieval model. Read the passage, think of a retrieval task "
            f"for which it is a good result, and write {kind.describe}"
            + (f" ({wanted})" if wanted else "")
            + '. Answer with JSON: {"task": "<one-sentence task instruction, e.g. '
            + f"'{kind.instruction}'" + '>", "query": "<the query>"}. Do not copy sentences of the passage into '
            f"the query.\n\nPassage:\n{passage}")
    return [{"role": "user", "content": text}]


def chat_schema(max_chars: int | None = None) -> dict:
    def field(limit: int) -> dict:
        return {"type": "string", "minLength": 1, "maxLength": min(limit, max_chars or limit)}

    return {"type": "object", "properties": {"task": field(TASK_CHARS), "query": field(QUERY_CHARS)},
            "required": ["task", "query"], "additionalProperties": False}


def parse_query(text: str, kind: QueryKind, form: str, schema: dict | None) -> dict[str, str]:
    """The query (and, in chat form, the task) of one generation; ``ParseError`` names why not."""
    if form == "chat":
        obj = parse_object(text)
        validate(obj, schema or chat_schema())
        task, query = obj["task"].strip(), obj["query"].strip()
    else:
        task, query = kind.instruction, text.strip()
    query = query.strip().strip('"').strip()
    if not query:
        raise ParseError("empty_query")
    if "\n" in query:
        raise ParseError("not_one_line")
    if any(f"{label}:" in query for label in ("Passage", kind.label)):
        raise ParseError("echoes_prompt")
    if kind.must_end and not query.endswith(kind.must_end):
        raise ParseError(f"not_a_{kind.name}")
    return {"task": task, "query": query}


class GroundedPipeline(Pipeline):
    """The generation pipeline over a corpus's passages instead of the taxonomy's categories;
    shards, resume, duplicate removal and the manifest are the base pipeline's."""

    def __init__(self, settings: Settings, backend_factory, cut=None) -> None:
        super().__init__(settings, backend_factory)
        # Only the query parameters of the taxonomy; no categories, so no brainstorm.
        self.taxonomy = Taxonomy({}, {p: self.taxonomy.parameters[p] for p in QUERY_PARAMETERS},
                                 self.taxonomy.languages)
        all_kinds = load_query_kinds(settings.query_kinds_file)
        unknown = sorted(set(settings.query_kinds) - set(all_kinds))
        if unknown:
            raise ValueError(f"--query-kinds: unknown {unknown}; known: {sorted(all_kinds)}")
        self.kinds = {k: all_kinds[k] for k in (settings.query_kinds or list(all_kinds))}
        self.cut = cut or (lambda text: text)

    @property
    def category_names(self) -> list[str]:
        return list(self.kinds)

    def record_filter(self) -> RecordFilter:
        return RecordFilter(decontaminate=self.s.decontaminate, seed=self.s.seed, query_only=True)

    def passages(self) -> list[Passage]:
        """Every passage of the corpus as the queries see it (deduplicated, cut), also written to
        ``passages.jsonl``: the candidate pool ``synth.relabel`` retrieves from."""
        passages = [Passage(p.id, self.cut(p.text)) for p in read_passages(self.s.corpus)]
        path = self.out / PASSAGES_FILE
        if not path.is_file():
            atomic_write(path, jsonl([{"id": p.id, "text": p.text} for p in passages]))
        return passages

    def items(self, tasks: dict[str, list[str]]) -> list[dict]:
        kinds = list(self.kinds)
        passages = self.passages()
        if self.s.max_passages and self.s.max_passages < len(passages):
            keep = np.sort(_rng(self.s, "passages").permutation(len(passages))[: self.s.max_passages])
            passages = [passages[i] for i in keep]
        items = []
        for number, passage in enumerate(passages):
            for q in range(self.s.queries_per_passage):
                rng = _rng(self.s, "grounded", passage.id, q)
                kind = kinds[int(rng.integers(len(kinds)))]
                params = {p: values[int(rng.integers(len(values)))] for p, values in self.taxonomy.parameters.items()}
                items.append({"id": f"corpus-{number:06d}-{q}", "category": kind, "task": None,
                              "language": None, "params": params, "seed": _seed(rng),
                              "passage_id": passage.id, "passage": passage.text})
        return [it for i, it in enumerate(items) if i % self.s.num_shards == self.s.shard_index]

    def _request(self, item: dict, attempt: int) -> ChatRequest:
        kind = self.kinds[item["category"]]
        seed = item["seed"] + attempt * 1_000_003
        if self.s.prompt_form == "chat":
            return ChatRequest(chat_messages(kind, item["passage"], item["params"]),
                               chat_schema(self.s.max_field_chars), seed, self.s.max_tokens, self.s.temperature,
                               self.s.top_p)
        return ChatRequest(None, None, seed, self.s.max_tokens, self.s.temperature, self.s.top_p,
                           prompt=fewshot_prompt(kind, item["passage"], item["params"]), stop=("\n",))

    def parse(self, item: dict, text: str, request: ChatRequest) -> dict:
        return parse_query(text, self.kinds[item["category"]], self.s.prompt_form, request.schema)

    def to_record(self, item: dict, fields: dict) -> dict:
        instruction = self.s.instruction or fields["task"]
        return {"query": fields["query"], "positive": item["passage"], "negatives": [], "instruction": instruction,
                "task": f"corpus/{item['category']}", "score": None,
                "meta": {"id": item["id"], "passage_id": item["passage_id"], "kind": item["category"],
                         "params": item["params"], "seed": item["seed"], "form": self.s.prompt_form}}


def token_cutter(model: str, max_tokens: int | None):
    """Cuts a passage to ``max_tokens`` tokens of the generator's tokenizer (a local model), or
    to as many words where the model is only a name on a server."""
    if not max_tokens:
        return None
    try:
        path = model_path(model)
    except BackendError:
        path = None
    if path is None or not Path(path).is_dir():
        return lambda text: " ".join(text.split()[:max_tokens])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()

    return cut

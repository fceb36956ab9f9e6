"""The two-step generation pipeline, shared by every backend.

Work items are a pure function of the seed (and, for asymmetric categories, of the brainstormed
task list): re-running the same command regenerates the same items, and finished shards are
skipped, so a killed run continues without duplicates or gaps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from llmembed import runlock
from llmembed.data.schema import parse_record
from llmembed.outputs import STAGING_TAG, Kind, check_output
from synth.backends import Backend, ChatRequest
from synth.filters import RecordFilter, normalise
from synth.parse import ParseError, parse_example, parse_tasks, to_record
from synth.prompts import brainstorm_schema, example_schema, render, template_hashes
from synth.store import ShardStore, atomic_write, merge_stats
from synth.taxonomy import Taxonomy

logger = logging.getLogger("synth")
TASKS_PER_BRAINSTORM = 20


@dataclass
class Settings:
    out: str
    model: str = "default"
    backend: str = "transformers"
    seed: int = 0
    num_tasks: int = 4
    examples_per_task: int = 2
    categories: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    max_attempts: int = 3
    shard_size: int = 64
    num_shards: int = 1
    shard_index: int = 0
    taxonomy: str | None = None
    tasks_file: str | None = None
    decontaminate: str | None = None
    max_field_chars: int | None = None
    # The backend's settings that change what is generated (constrained decoding, dtype, the
    # batch a seed is drawn for...): part of the run key, so a rerun with others is refused.
    decoding: dict = field(default_factory=dict)
    # Corpus mode (synth.grounded): queries written for the passages of this JSONL file.
    corpus: str | None = None
    corpus_sha256: str | None = None
    queries_per_passage: int = 1
    query_kinds: list[str] = field(default_factory=list)
    query_kinds_file: str | None = None
    prompt_form: str = "fewshot"
    passage_max_tokens: int | None = 256
    max_passages: int | None = None
    instruction: str | None = None  # every record's task instruction (default: the kind's or the LLM's)

    def run_key(self) -> dict:
        """Settings that must match for a rerun to continue an existing output folder."""
        key = asdict(self)
        key.pop("out")
        key.pop("max_attempts")
        if self.corpus is None:  # the corpus mode's settings do not apply
            for name in CORPUS_SETTINGS:
                key.pop(name)
        return key


CORPUS_SETTINGS = ("corpus", "corpus_sha256", "queries_per_passage", "query_kinds", "query_kinds_file", "prompt_form",
                   "passage_max_tokens", "max_passages", "instruction")


def _key(*parts) -> list[int]:
    return [zlib.crc32(str(p).encode()) if not isinstance(p, int) else p for p in parts]


def _rng(settings: Settings, *parts) -> np.random.Generator:
    return np.random.default_rng(_key(settings.seed, *parts))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


class Pipeline:
    def __init__(self, settings: Settings, backend_factory) -> None:
        self.s = settings
        self.backend_factory = backend_factory
        self._backend: Backend | None = None
        self.taxonomy = Taxonomy.load(settings.taxonomy).restrict(settings.categories or None,
                                                                  settings.languages or None)
        self.out = Path(settings.out)
        self.part = f"part{settings.shard_index:03d}of{settings.num_shards:03d}"
        inputs = [settings.taxonomy, settings.tasks_file, settings.decontaminate, settings.corpus,
                  settings.query_kinds_file, settings.model if Path(settings.model).is_dir() else None]
        check_output(self.out, inputs=inputs, kind=SYNTH_KIND, continues=True)
        if settings.decontaminate and not Path(settings.decontaminate).is_file():
            raise FileNotFoundError(f"--decontaminate {settings.decontaminate}: no such file")
        self.user_tasks = read_tasks_file(settings.tasks_file) if settings.tasks_file else {}
        self.store = ShardStore(self.out, self.part)
        self.started = time.perf_counter()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self.backend_factory()
        return self._backend

    # ------------------------------------------------------------------ settings check
    @property
    def manifest_path(self) -> Path:
        # Data-parallel processes share --out; each keeps its own manifest.
        return self.out / ("manifest.json" if self.s.num_shards == 1 else f"manifest.{self.part}.json")

    def previous_manifest(self) -> dict:
        """The manifest a previous run left in --out ({} if none)."""
        path = self.manifest_path
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path}: unreadable manifest ({err}); it is written atomically, so this is not "
                             "from an interrupted run: move it away to start over in this folder") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{path}: not a synth manifest")
        return manifest

    def check_output_folder(self) -> None:
        previous = self.previous_manifest().get("run_key")
        if previous is not None and previous != self.s.run_key():
            changed = sorted(k for k in set(previous) | set(self.s.run_key())
                             if previous.get(k) != self.s.run_key().get(k))
            raise ValueError(f"{self.out} holds a run with other settings ({', '.join(changed)}); "
                             "use another --out or the same settings")

    # ------------------------------------------------------------------ brainstorm
    def brainstorm(self) -> dict[str, list[str]]:
        path = self.out / "brainstorm.json"
        wanted = [c for c in self.taxonomy.categories.values() if c.brainstorm]
        user = self.user_tasks
        if path.is_file():
            return json.loads(path.read_text())["tasks"]
        tasks: dict[str, list[str]] = {}
        stats = Counter()
        for cat in wanted:
            if cat.name in user:
                tasks[cat.name] = list(dict.fromkeys(user[cat.name]))[: self.s.num_tasks]
                continue
            found: dict[str, str] = {}
            per = min(TASKS_PER_BRAINSTORM, self.s.num_tasks)
            for attempt in range(self.s.max_attempts):
                need = self.s.num_tasks - len(found)
                if need <= 0:
                    break
                requests = []
                for r in range(math.ceil(need / per)):
                    rng = _rng(self.s, "brainstorm", cat.name, attempt, r)
                    requests.append(ChatRequest(render(f"brainstorm_{cat.name}", count=per), brainstorm_schema(per, self.s.max_field_chars),
                                                _seed(rng), self.s.max_tokens, self.s.temperature, self.s.top_p))
                for request, gen in zip(requests, self.backend.generate(requests), strict=True):
                    stats["tokens_in"] += gen.tokens_in
                    stats["tokens_out"] += gen.tokens_out
                    try:
                        for task in parse_tasks(gen.text, request.schema):
                            if plausible_task(task):
                                found.setdefault(normalise(task), task)
                            else:
                                stats["rejected_implausible_task"] += 1
                    except ParseError as err:
                        stats[f"rejected_{err.reason}"] += 1
            if len(found) < self.s.num_tasks:
                logger.warning("brainstorm for %s gave %d of %d tasks; filling from the taxonomy's seed tasks",
                               cat.name, len(found), self.s.num_tasks)
                for task in cat.seed_tasks:
                    if len(found) < self.s.num_tasks and normalise(task) not in found:
                        found[normalise(task)] = task
                        stats[f"seed_tasks_used_{cat.name}"] += 1
            tasks[cat.name] = list(found.values())[: self.s.num_tasks]
        atomic_write(path, json.dumps({"tasks": tasks, "stats": dict(stats)}, indent=2, ensure_ascii=False))
        return tasks

    # ------------------------------------------------------------------ work items
    def items(self, tasks: dict[str, list[str]]) -> list[dict]:
        languages = list(self.taxonomy.languages)
        weights = np.asarray([self.taxonomy.languages[l] for l in languages], dtype=float)
        weights /= weights.sum()
        items = []
        for cat in self.taxonomy.categories.values():
            cat_tasks = tasks.get(cat.name, []) if cat.brainstorm else [None] * self.s.num_tasks
            for ti, task in enumerate(cat_tasks):
                for ei in range(self.s.examples_per_task):
                    rng = _rng(self.s, "example", cat.name, ti, ei)
                    language = languages[int(rng.choice(len(languages), p=weights))]
                    params = {p: self.taxonomy.parameters[p][int(rng.integers(len(self.taxonomy.parameters[p])))]
                              for p in cat.params}
                    if cat.name == "bitext":
                        params["target_language"] = "English" if language != "English" else "Chinese"
                    items.append({"id": f"{cat.name}-{ti:04d}-{ei:03d}", "category": cat.name, "task": task,
                                  "language": language, "params": params, "seed": _seed(rng)})
        return [it for i, it in enumerate(items) if i % self.s.num_shards == self.s.shard_index]

    def _request(self, item: dict, attempt: int) -> ChatRequest:
        values = {"task": item["task"], "language": item["language"], **item["params"]}
        return ChatRequest(render(f"example_{item['category']}", **values), example_schema(item["category"], self.s.max_field_chars),
                           item["seed"] + attempt * 1_000_003, self.s.max_tokens, self.s.temperature, self.s.top_p)

    def parse(self, item: dict, text: str, request: ChatRequest) -> dict:
        """The fields of one generation (``ParseError`` names why not). The schema it was
        decoded with is enforced here for unconstrained endpoints too."""
        return parse_example(text, item["category"], request.schema)

    def to_record(self, item: dict, fields: dict) -> dict:
        return to_record(item["category"], fields, item["task"], item["language"],
                         {"id": item["id"], "params": item["params"], "seed": item["seed"]})

    def record_filter(self) -> RecordFilter:
        return RecordFilter(decontaminate=self.s.decontaminate, seed=self.s.seed)

    @property
    def category_names(self) -> list[str]:
        return list(self.taxonomy.categories)

    # ------------------------------------------------------------------ shards
    def run_shard(self, index: int, items: list[dict], filt: RecordFilter) -> dict:
        started = time.perf_counter()
        stats = {"generated": len(items), "accepted": 0, "rejected": 0, "tokens_in": 0, "tokens_out": 0,
                 "attempts": 0, "accepted_by_category": Counter(), "generated_by_category": Counter(),
                 "accepted_by_language": Counter(), "rejected_by_reason": Counter()}
        parsed: dict[str, dict] = {}
        failure: dict[str, str] = {}
        raw: list[dict] = []
        pending = list(items)
        for attempt in range(self.s.max_attempts):
            if not pending:
                break
            requests = [self._request(it, attempt) for it in pending]
            gens = self.backend.generate(requests)
            retry = []
            for item, request, gen in zip(pending, requests, gens, strict=True):
                stats["attempts"] += 1
                stats["tokens_in"] += gen.tokens_in
                stats["tokens_out"] += gen.tokens_out
                row = {"id": item["id"], "attempt": attempt, "text": gen.text, "finish_reason": gen.finish_reason,
                       "tokens_in": gen.tokens_in, "tokens_out": gen.tokens_out, "requests": gen.attempts}
                try:
                    if gen.error:
                        raise ParseError("backend_error", gen.error)
                    parsed[item["id"]] = self.parse(item, gen.text, request)
                    row["status"] = "parsed"
                except ParseError as err:
                    failure[item["id"]] = err.reason
                    row["status"] = err.reason
                    retry.append(item)
                raw.append(row)
            pending = retry
        records = []
        for item in items:
            stats["generated_by_category"][item["category"]] += 1
            if item["id"] not in parsed:
                reason = failure[item["id"]]
            else:
                record = self.to_record(item, parsed[item["id"]])
                reason = filt.check(record, item["id"])
                if reason is None:
                    _validate(record)
                    records.append(record)
                    stats["accepted"] += 1
                    stats["accepted_by_category"][item["category"]] += 1
                    stats["accepted_by_language"][item["language"]] += 1
                    continue
            stats["rejected"] += 1
            stats["rejected_by_reason"][reason] += 1
            raw.append({"id": item["id"], "status": f"rejected:{reason}"})
        stats["wall_time_s"] = time.perf_counter() - started
        stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
        self.store.write(index, records, raw, stats)
        return stats

    def run(self, progress: bool = True) -> dict:
        # One writer per part of --out (data-parallel parts each take their own); a second
        # command on the same part would write the same shards twice.
        lock = runlock.hold(self.out, f".synth-{self.part}.lock", "synth run",
                            "wait for it or stop it, or use another --out")
        try:
            return self._run(progress)
        finally:
            lock.close()

    def _run(self, progress: bool) -> dict:
        self.check_output_folder()
        previous = self.previous_manifest()
        if not previous.get("complete"):
            self.backend  # load it now: a missing package or a bad model fails before any work
        self.write_manifest(complete=False)
        tasks = self.brainstorm() if any(c.brainstorm for c in self.taxonomy.categories.values()) else {}
        items = self.items(tasks)
        shards = [items[i : i + self.s.shard_size] for i in range(0, len(items), self.s.shard_size)]
        filt = self.record_filter()
        for index in range(len(shards)):  # rebuild the duplicate index from finished shards
            if self.store.done(index):
                for record in self.store.records(index):
                    filt.remember(record, record["meta"]["id"])
        from tqdm.auto import tqdm

        done_items = sum(len(s) for i, s in enumerate(shards) if self.store.done(i))
        bar = tqdm(total=len(items), initial=done_items, desc="synth", unit="example", disable=not progress)
        for index, shard in enumerate(shards):
            if self.store.done(index):
                continue
            self.run_shard(index, shard, filt)
            bar.update(len(shard))
            self.write_manifest(complete=False, num_shards=len(shards))
        bar.close()
        return self.write_manifest(complete=True, num_shards=len(shards))

    def write_manifest(self, complete: bool, num_shards: int | None = None) -> dict:
        totals = merge_stats(self.store.all_stats())
        brainstorm = self.out / "brainstorm.json"
        manifest = {
            "run_key": self.s.run_key(),
            "model": self.s.model,
            "backend": self._backend.describe() if self._backend is not None else {"backend": self.s.backend},
            "sampling": {"temperature": self.s.temperature, "top_p": self.s.top_p, "max_tokens": self.s.max_tokens,
                         "max_attempts": self.s.max_attempts},
            "seed": self.s.seed,
            "categories": self.category_names,
            "template_hashes": template_hashes(),
            "taxonomy_sha256": hashlib.sha256(json.dumps(asdict_taxonomy(self.taxonomy), sort_keys=True).encode()).hexdigest()[:16],
            "brainstorm": ({k: len(v) for k, v in json.loads(brainstorm.read_text())["tasks"].items()}
                           if brainstorm.is_file() else None),
            "shards_done": len(self.store.all_stats()),
            "shards_total": num_shards,
            "complete": complete,
            "totals": totals,
        }
        atomic_write(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
        return manifest


# What a synth run writes into --out (temporary files of atomic writes start with a dot).
PASSAGES_FILE = "passages.jsonl"  # corpus mode: the corpus as the queries saw it
OUTPUT_ENTRIES = ("shards", "raw", "stats", "merged", "brainstorm.json", PASSAGES_FILE, "manifest.json", "manifest.part*.json",
                  ".synth-part*.lock", f".*{STAGING_TAG}*", ".manifest*.json.*", ".brainstorm.json.*")


def _is_synth_output(out: Path) -> bool:
    """A synth output (to continue): a folder holding nothing but what synth writes, never a
    folder of other files, which a run would fill with its own."""
    return all(any(fnmatch(p.name, e) for e in OUTPUT_ENTRIES) for p in out.iterdir())


SYNTH_KIND = Kind("a synth output folder", folder=True, recognise=_is_synth_output)


def read_tasks_file(path: str) -> dict[str, list[str]]:
    """``--tasks-file``: JSON {"category": ["task definition", ...]}, checked before any work."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--tasks-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"--tasks-file {path}: not valid JSON ({err})") from None
    if not isinstance(tasks, dict):
        raise ValueError(f'--tasks-file {path}: expected {{"category": ["task definition", ...]}}')
    for category, definitions in tasks.items():
        if not isinstance(definitions, list) or not all(isinstance(d, str) and d.strip() for d in definitions):
            raise ValueError(f"--tasks-file {path}: {category!r} must be a list of non-empty strings")
    return tasks


def plausible_task(task: str) -> bool:
    """A task definition reads like a sentence: several words, mostly letters."""
    letters = sum(c.isalpha() for c in task)
    return len(task.split()) >= 3 and letters >= 0.6 * len(task.replace(" ", ""))


def asdict_taxonomy(tax: Taxonomy) -> dict:
    return {"categories": {k: [v.brainstorm, list(v.params)] for k, v in tax.categories.items()},
            "parameters": tax.parameters, "languages": tax.languages}


def _validate(record: dict) -> None:
    """Every record must load in the trainer's reader unchanged."""
    parse_record(record)

"""Training records kept on disk as memory-mapped Arrow, shared by every rank.

Reading a JSONL file into Python objects costs about 2 KB of memory per record in every
rank (4.6 GB per rank for E5-mistral's 2.3M pairs). Here a file is parsed once — with the
same checks and one-line ``file:line: field ...`` errors as :func:`~llmembed.data.readers.read_jsonl`
— into an Arrow file written by the ``datasets`` library, and every later start, and every
rank on the machine, memory-maps that file: its pages live once in the page cache, and a
record becomes Python objects only while its batch is built.

The Arrow file sits in a cache folder (``.llmembed-cache`` beside the data, or ``$LLMEMBED_CACHE/data``
where that folder cannot be written), named by a fingerprint of the source (its resolved
path, size and modification time) and the reading options. With it go a small JSON file of
what the read counted (records, skipped lines, :class:`~llmembed.data.schema.RecordFacts`),
so that a warm start replays the same warnings and chooses the same loss without walking the
records, and any per-record arrays derived from them (token lengths for length grouping,
keyed also by the tokenizer) as ``.npy`` files, memory-mapped the same way. A lock makes the
first rank build and the others wait for it; files are written under a temporary name and
renamed, so a killed build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock

from llmembed.data.readers import ReadReport, parse_lines
from llmembed.data.schema import DataError, Record, RecordFacts
from llmembed.resolve import cache_dir as llmembed_cache_dir

logger = logging.getLogger(__name__)

# Bump when the Arrow layout or the rules that parse a record change: old caches are then unused.
FORMAT = 1
CACHE_FOLDER = ".llmembed-cache"
FEATURES = Features({
    "query": Value("string"),
    "positives": List(Value("string")),
    "negatives": List(Value("string")),
    "instruction": Value("string"),
    "task": Value("string"),
    "score": Value("float64"),
    "meta": Value("string"),  # JSON text: meta is free-form, Arrow columns are typed
    "plain_text": Value("bool"),
})
WRITE_BATCH = 10_000  # records parsed and written at a time (bounds the memory a build needs)


class RecordTable(Sequence[Record]):
    """The records of one file, read from a memory-mapped Arrow table on demand.

    ``table[row]`` is a :class:`Record` made for the caller; ``table[row] = record`` keeps a
    replacement in memory (re-mining swaps a record's negatives), which later reads return."""

    def __init__(self, dataset: Dataset, facts: RecordFacts, source: Path, folder: Path, stem: str) -> None:
        self.dataset = dataset  # a datasets.Dataset, for whoever wants the HF tooling on it
        self.facts = facts
        self.source = source
        self._arrow = dataset.data.table
        self._folder, self._stem = folder, stem
        self.changed: dict[int, Record] = {}

    def __len__(self) -> int:
        return self._arrow.num_rows

    def __getitem__(self, row: int) -> Record:  # type: ignore[override]
        if row in self.changed:
            return self.changed[row]
        if not 0 <= row < len(self):
            raise IndexError(f"record {row} of {len(self)}")
        return _record(self._arrow.slice(row, 1).to_pylist()[0])

    def __setitem__(self, row: int, record: Record) -> None:
        self.changed[row] = record

    def __iter__(self) -> Iterator[Record]:
        for start in range(0, len(self), WRITE_BATCH):
            for offset, value in enumerate(self._arrow.slice(start, WRITE_BATCH).to_pylist()):
                yield self.changed.get(start + offset) or _record(value)

    def cached(self, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A per-record array derived from these records, made once and kept beside the table
        as ``<stem>-<name>.npy`` (memory-mapped on later starts). ``name`` must say everything
        the array depends on besides the records (a tokenizer's fingerprint, say)."""
        path = self._folder / f"{self._stem}-{name}.npy"
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                array = np.asarray(make())
                if len(array) != len(self):
                    raise ValueError(f"{name}: {len(array)} rows for {len(self)} records")
                partial = path.with_name(f".{path.name}.partial.npy")
                np.save(partial, array)
                os.replace(partial, path)
        return np.load(path, mmap_mode="r")


def _record(value: dict) -> Record:
    return Record(value["query"], value["positives"], value["negatives"], value["instruction"], value["task"],
                  value["score"], json.loads(value["meta"]), value["plain_text"])


def _columns(records: list[Record]) -> dict[str, list]:
    return {"query": [r.query for r in records], "positives": [r.positives for r in records],
            "negatives": [r.negatives for r in records], "instruction": [r.instruction for r in records],
            "task": [r.task for r in records], "score": [r.score for r in records],
            "meta": [json.dumps(r.meta, ensure_ascii=False) for r in records],
            "plain_text": [r.plain_text for r in records]}


def fingerprint(path: Path, skip_invalid: bool, ignore_unknown_keys: bool) -> str:
    """Names one parse of one version of a file: what ``datasets`` uses for local files (path,
    size, modification time) and the options that change what a parse keeps."""
    key = json.dumps([FORMAT, str(path.resolve()), *_version(path), skip_invalid, ignore_unknown_keys])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_folder(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the cache of ``path`` goes: ``cache_dir`` when given, else ``.llmembed-cache``
    beside the data, else (a folder this user cannot write) ``$LLMEMBED_CACHE/data``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.access(path.parent, os.W_OK):
        return path.parent / CACHE_FOLDER
    return llmembed_cache_dir() / "data"


def open_records(path: str | Path, skip_invalid: bool = False, report: ReadReport | None = None,
                 ignore_unknown_keys: bool = False, cache_dir: str | Path | None = None) -> RecordTable:
    """The records of a JSONL file as a :class:`RecordTable`, parsed into the cache on first use.

    Same contract as :func:`~llmembed.data.readers.read_jsonl`: a bad line raises
    :class:`DataError` (``file:line: ...``), or with ``skip_invalid`` is counted in ``report``
    (a warm start counts it again from the cache, and warns the same way)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    folder = cache_folder(path, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{path.stem}-{fingerprint(path, skip_invalid, ignore_unknown_keys)}"
    summary_path = folder / f"{stem}.json"
    with FileLock(str(folder / f"{stem}.lock")):
        if not summary_path.is_file():
            _build(path, folder, stem, skip_invalid, ignore_unknown_keys)
            _forget_older_versions(path, folder, stem)
    summary = json.loads(summary_path.read_text())
    read = ReadReport(summary["kept"], Counter(summary["skipped"]), summary["first_errors"])
    if report is not None:
        report.kept += read.kept
        report.skipped.update(read.skipped)
        report.first_errors.extend(read.first_errors[: max(0, 5 - len(report.first_errors))])
    if read.skipped_total:
        logger.warning("%s: skipped %d invalid record(s): %s", path, read.skipped_total, dict(read.skipped))
    dataset = Dataset.from_file(str(folder / f"{stem}.arrow"))
    return RecordTable(dataset, RecordFacts(**summary["facts"]), path, folder, stem)


def _build(path: Path, folder: Path, stem: str, skip_invalid: bool, ignore_unknown_keys: bool) -> None:
    """Parse ``path`` into ``<stem>.arrow`` and ``<stem>.json``, a batch at a time."""
    partial = folder / f".{stem}.arrow.partial"
    report, facts, batch = ReadReport(), RecordFacts(), []
    try:
        with ArrowWriter(features=FEATURES, path=str(partial)) as writer:
            for record in parse_lines(path, skip_invalid, report, ignore_unknown_keys):
                facts = facts.add(record)
                batch.append(record)
                if len(batch) == WRITE_BATCH:
                    writer.write_batch(_columns(batch))
                    batch = []
            if batch:
                writer.write_batch(_columns(batch))
            writer.finalize()
        os.replace(partial, folder / f"{stem}.arrow")
    finally:
        partial.unlink(missing_ok=True)
    summary = {"source": str(path.resolve()), "version": _version(path), "kept": report.kept, "skipped": dict(report.skipped),
               "first_errors": report.first_errors, "facts": facts.__dict__}
    partial_summary = folder / f".{stem}.json.partial"
    partial_summary.write_text(json.dumps(summary, indent=1))
    os.replace(partial_summary, folder / f"{stem}.json")


def _version(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _forget_older_versions(path: Path, folder: Path, stem: str) -> None:
    """Remove the caches of earlier versions of the same file (its content changed since): a
    dataset edited a hundred times must not leave a hundred copies. A reading of the current
    version with other options stays. A process that still maps an old table keeps reading it:
    unlinking a mapped file leaves its pages to the mapping."""
    source, version = str(path.resolve()), _version(path)
    for other in folder.glob(f"{path.stem}-*.json"):
        other_stem = other.name[: -len(".json")]
        if other_stem == stem:
            continue
        try:
            summary = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if summary.get("source") == source and summary.get("version") != version:
            for leftover in folder.glob(f"{other_stem}*"):
                leftover.unlink(missing_ok=True)

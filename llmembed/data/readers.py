"""Read JSONL files of records, naming file and line for every bad one."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmembed.data.schema import DataError, Record, parse_record

logger = logging.getLogger(__name__)


@dataclass
class ReadReport:
    """What a read kept and what it skipped (by reason)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def decode_json_line(raw: bytes | str) -> Any:
    """One JSONL line's value; :class:`DataError` (without a location: callers add file and
    line) when it is not UTF-8 or not JSON."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON ({err.msg} at column {err.colno})") from None


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file; a line that is not
    UTF-8 JSON raises :class:`DataError` as ``file:line: ...``. What the values must be is the
    caller's to check (and to report with the same ``file:line`` prefix)."""
    for number, _, value in json_lines_with_text(path):
        yield number, value


def json_lines_with_text(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """Like :func:`json_lines`, with each line's text as written (for filters that copy lines
    rather than rewrite them)."""
    path = Path(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                value = decode_json_line(raw)
            except DataError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            yield number, raw.decode("utf-8").rstrip("\r\n"), value


def read_jsonl(path: str | Path, skip_invalid: bool = False, report: ReadReport | None = None,
               ignore_unknown_keys: bool = False) -> list[Record]:
    """All records of ``path``. A bad line raises :class:`DataError` (``file:line: ...``), or is
    counted in ``report`` when ``skip_invalid``. Unknown keys are bad unless ``ignore_unknown_keys``.
    Training keeps large files on disk instead (:func:`llmembed.data.store.open_records`)."""
    report = report if report is not None else ReadReport()
    before = report.skipped_total
    records = list(parse_lines(path, skip_invalid, report, ignore_unknown_keys))
    if report.skipped_total > before:
        logger.warning("%s: skipped %d invalid record(s): %s", path, report.skipped_total - before, dict(report.skipped))
    return records


def parse_lines(path: str | Path, skip_invalid: bool, report: ReadReport,
                ignore_unknown_keys: bool = False) -> Iterator[Record]:
    """The records of ``path`` one at a time, with :func:`read_jsonl`'s checks and counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = parse_record(decode_json_line(raw), ignore_unknown_keys)
            except DataError as err:
                message = f"{path}:{number}: {err}"
                if not skip_invalid:
                    raise DataError(message) from None
                reason = str(err).split(":")[0] if str(err).startswith("field") else str(err).split(" (")[0]
                report.skipped[reason] += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(message)
                continue
            report.kept += 1
            yield record

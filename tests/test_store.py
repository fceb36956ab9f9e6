"""The training store: JSONL parsed once into memory-mapped Arrow, the same records and errors
as the plain reader, reused on warm starts, rebuilt when the file changes, built once when
several processes start together."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from llmembed.data.readers import ReadReport, read_jsonl
from llmembed.data.sampling import record_lengths, token_lengths
from llmembed.data.schema import DataError, Record, RecordFacts
from llmembed.data.store import CACHE_FOLDER, open_records

LINES = [
    {"query": "what is arrow", "positive": "a columnar format", "negatives": ["a fish", "a bow"],
     "instruction": "Find the answer", "task": "qa", "meta": {"mining": {"positive_score": 0.5, "ids": [1, 2]}}},
    {"anchor": "sts a", "positive": "sts b", "score": 0.25},
    {"query": "q3", "pos": ["p3", "p3 again"], "neg": []},
    {"text": "plain text, ünïcode"},
]


def write(path: Path, values: list) -> Path:
    path.write_text("".join((v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) + "\n" for v in values))
    return path


def arrow_files(path: Path) -> list[Path]:
    return sorted((path.parent / CACHE_FOLDER).glob("*.arrow"))


def test_the_table_holds_exactly_what_the_reader_reads(tmp_path):
    data = write(tmp_path / "train.jsonl", LINES)
    table = open_records(data)
    expected = read_jsonl(data)
    assert len(table) == 4
    assert [table[i] for i in range(len(table))] == expected
    assert list(table) == expected
    assert table.facts == RecordFacts.of(expected) == RecordFacts(count=4, plain_text=1, scored=1, with_negatives=1)
    with pytest.raises(IndexError):
        table[4]


def test_a_warm_start_reuses_the_cache_and_an_edited_file_is_parsed_again(tmp_path):
    data = write(tmp_path / "train.jsonl", LINES)
    open_records(data)
    [arrow] = arrow_files(data)
    built = arrow.stat().st_mtime_ns
    again = open_records(data)
    assert arrow_files(data) == [arrow] and arrow.stat().st_mtime_ns == built
    assert list(again) == read_jsonl(data)
    # An edit (new size and time) is a new version: parsed again, the old cache removed.
    write(data, LINES[:2])
    edited = open_records(data)
    assert len(edited) == 2 and list(edited) == read_jsonl(data)
    [new_arrow] = arrow_files(data)
    assert new_arrow != arrow and not arrow.exists()


def test_a_bad_line_fails_like_the_reader_and_leaves_no_cache(tmp_path):
    data = write(tmp_path / "train.jsonl", [LINES[0], {"query": "q", "positive": 3}, LINES[1]])
    with pytest.raises(DataError) as from_reader:
        read_jsonl(data)
    with pytest.raises(DataError) as from_store:
        open_records(data)
    assert str(from_store.value) == str(from_reader.value) == f"{data}:2: field 'positive': expected a string or a " \
                                                                "list of strings, got int"
    folder = tmp_path / CACHE_FOLDER
    assert not list(folder.glob("*.arrow")) and not list(folder.glob("*.json")) and not list(folder.glob("*partial*"))


def test_skipped_lines_are_counted_and_warned_about_on_every_start(tmp_path, caplog):
    data = write(tmp_path / "train.jsonl", [LINES[0], "{not json", {"query": "q"}, LINES[1]])
    counts = []
    for _ in range(2):  # cold, then warm
        report = ReadReport()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmembed.data.store"):
            table = open_records(data, skip_invalid=True, report=report)
        counts.append((len(table), report.kept, dict(report.skipped), len(report.first_errors)))
        assert "skipped 2 invalid record(s)" in caplog.text
    expected = ReadReport()
    read_jsonl(data, skip_invalid=True, report=expected)
    assert counts[0] == counts[1] == (2, 2, dict(expected.skipped), 2)
    # Reading strictly is another parse of the same file, with its own error.
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        open_records(data)


def test_derived_arrays_are_made_once_and_memory_mapped(tmp_path, default_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)

    def count(texts):
        calls.append(len(texts))
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    data = write(tmp_path / "train.jsonl", LINES * 3)
    calls: list[int] = []
    lengths = open_records(data).cached("lengths-test", lambda: token_lengths(open_records(data), count, chunk=5))
    assert calls and isinstance(lengths, np.memmap)
    calls.clear()
    warm = open_records(data).cached("lengths-test", lambda: token_lengths(open_records(data), count))
    assert calls == [] and np.array_equal(warm, lengths)
    # The same numbers the in-memory path groups by, chunked or not, capped or not.
    records = read_jsonl(data)
    assert np.array_equal(record_lengths(records, count), lengths)
    assert np.array_equal(record_lengths(open_records(data), count, passage_cap=3, query_cap=2),
                          record_lengths(records, count, passage_cap=3, query_cap=2))
    assert lengths[0].tolist() == [max(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                       for t in ("a columnar format", "a fish", "a bow")),
                                   len(tokenizer("what is arrow", add_special_tokens=False)["input_ids"])]


def test_a_replaced_record_is_read_back_until_the_table_is_reopened(tmp_path):
    data = write(tmp_path / "train.jsonl", LINES)
    table = open_records(data)
    table[0] = Record("what is arrow", ["a columnar format"], ["new negative"])
    assert table[0].negatives == ["new negative"] and list(table)[0].negatives == ["new negative"]
    assert open_records(data)[0].negatives == ["a fish", "a bow"]


def test_an_explicit_cache_dir_keeps_the_data_folder_untouched(tmp_path):
    (tmp_path / "data").mkdir()
    data = write(tmp_path / "data" / "train.jsonl", LINES)
    table = open_records(data, cache_dir=tmp_path / "cache")
    assert len(table) == 4 and os.listdir(tmp_path / "data") == ["train.jsonl"]
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 1


def _open_and_count(path: str, queue) -> None:
    table = open_records(path)
    queue.put((len(table), os.stat(table.dataset.cache_files[0]["filename"]).st_ino))


def test_processes_starting_together_build_the_cache_once(tmp_path):
    data = write(tmp_path / "train.jsonl", LINES * 5000)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_open_and_count, args=(str(data), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        counts = [queue.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    # One build: every process mapped the same file (a second build would have replaced it).
    [arrow] = arrow_files(data)
    assert counts == [(20000, arrow.stat().st_ino)] * 3
    assert list(open_records(data))[-1] == read_jsonl(data)[-1]

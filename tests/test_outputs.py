"""The output-path policy every writing command shares (llmembed/outputs.py): outputs never
touch inputs (by path, link or inode), replace only their own kind with consent, are staged and
renamed with the user's umask, and killed writers' staging entries are removed by the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from llmembed.outputs import (
    STAGING_TAG,
    Kind,
    OutputError,
    any_json_with,
    check_output,
    remove_stale_staging,
    staged_file,
    staged_folder,
    write_text,
)

REPORT = Kind("a report", folder=False, recognise=any_json_with("scores"))
MODEL = Kind("a model folder", folder=True, recognise=lambda p: (p / "model.json").is_file())


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize("target,relation", [
    ("data/train.jsonl", "is the input"),
    ("data", "contains the input"),
    (".", "contains the input"),
    ("data/sub/out.json", "lies inside the input"),
    ("data/../data/train.jsonl", "is the input"),
])
def test_an_output_never_is_contains_or_sits_inside_an_input(tree, target, relation):
    with pytest.raises(OutputError, match=relation):
        check_output(tree / target, inputs=[tree / "data" / "train.jsonl", tree / "data"], kind=REPORT, overwrite=True)


def test_links_and_hard_links_do_not_get_around_it(tree):
    (tree / "link.jsonl").symlink_to(tree / "data" / "train.jsonl")
    (tree / "linked-dir").symlink_to(tree / "data")
    os.link(tree / "data" / "train.jsonl", tree / "hard.jsonl")
    inputs = [tree / "data" / "train.jsonl"]
    for target in ("link.jsonl", "hard.jsonl"):
        with pytest.raises(OutputError, match="is the input"):
            check_output(tree / target, inputs=inputs, kind=REPORT, overwrite=True)
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output(tree / "linked-dir" / "out.json", inputs=[tree / "data"], kind=REPORT, overwrite=True)


def test_existing_outputs_are_replaced_only_with_consent_and_only_of_their_kind(tree):
    with pytest.raises(OutputError, match="is not a report; it is never replaced"):
        check_output(tree / "notes.txt", inputs=[], kind=REPORT, overwrite=True)
    with pytest.raises(OutputError, match="is a folder, expected a file"):
        check_output(tree / "data", inputs=[], kind=REPORT, overwrite=True)
    with pytest.raises(OutputError, match="is a file, expected a folder"):
        check_output(tree / "notes.txt", inputs=[], kind=MODEL, overwrite=True)
    with pytest.raises(OutputError, match="not a model folder"):
        check_output(tree / "data", inputs=[], kind=MODEL, overwrite=True)
    (tree / "report.json").write_text(json.dumps({"scores": {}}))
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output(tree / "report.json", inputs=[], kind=REPORT)
    check_output(tree / "report.json", inputs=[], kind=REPORT, overwrite=True)
    check_output(tree / "model", inputs=[], kind=MODEL, continues=True)  # a rerun continues its own output
    (tree / "empty").mkdir()
    check_output(tree / "empty", inputs=[], kind=MODEL)  # an empty folder counts as absent
    with pytest.raises(OutputError, match="no such folder"):
        check_output(tree / "nowhere" / "r.json", inputs=[], kind=REPORT)


def test_staged_files_get_the_users_umask_and_replace_atomically(tree):
    old = os.umask(0o022)
    try:
        write_text(tree / "out.json", "one")
        assert oct((tree / "out.json").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o027)
        write_text(tree / "out.json", "two")
        assert oct((tree / "out.json").stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)
    assert (tree / "out.json").read_text() == "two"
    with pytest.raises(RuntimeError):
        with staged_file(tree / "out.json") as handle:
            handle.write("half")
            raise RuntimeError("killed mid-write")
    assert (tree / "out.json").read_text() == "two"
    assert not [p for p in tree.iterdir() if STAGING_TAG in p.name]


def test_a_failed_folder_build_leaves_the_previous_output(tree):
    with pytest.raises(RuntimeError):
        with staged_folder(tree / "model") as staging:
            (staging / "model.json").write_text("new")
            raise RuntimeError("failed")
    assert (tree / "model" / "model.json").read_text() == "{}"
    with staged_folder(tree / "model") as staging:
        (staging / "model.json").write_text("new")
    assert (tree / "model" / "model.json").read_text() == "new"
    assert sorted(p.name for p in tree.iterdir()) == ["data", "model", "notes.txt"]


HOLD = textwrap.dedent("""
    import sys, time
    from llmembed.outputs import staged_file, staged_folder
    kind, target = sys.argv[1], sys.argv[2]
    if kind == "file":
        with staged_file(target) as handle:
            handle.write("x"); handle.flush(); print("ready", flush=True); time.sleep(60)
    else:
        with staged_folder(target) as staging:
            (staging / "weights").write_text("x"); print("ready", flush=True); time.sleep(60)
""")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_staging_of_a_killed_writer_is_removed_by_the_next_run_but_a_live_ones_is_not(tmp_path, kind):
    target = tmp_path / ("out.jsonl" if kind == "file" else "export")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        [staging] = [p for p in tmp_path.iterdir() if STAGING_TAG in p.name]
        assert remove_stale_staging(target) == []  # its writer is alive: left alone
        assert staging.exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not target.exists() and staging.exists()  # the kill left it behind
        assert remove_stale_staging(target) == [staging]
        assert list(tmp_path.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""The transformers backend: JSON-schema-constrained decoding makes even a random model emit
parseable JSON; kill-and-resume reproduces an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from synth.backends import ChatRequest
from synth.parse import ParseError, parse_example
from synth.prompts import example_schema, render

from .conftest import save_tiny
from .processes import run_group

pytestmark = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="needs xgrammar")


@pytest.fixture(scope="module")
def random_lm(module_tmp, default_dir):
    return save_tiny(module_tmp("tiny-lm"), "llama", default_dir, vocab_size=49152, hidden_size=64,
                     heads=4, kv_heads=2)


def _parse_rate(backend, n, schema_category="short_short"):
    requests = [ChatRequest(render("example_short_short", task="Match questions", language="English"),
                            example_schema(schema_category, max_chars=48), seed=i, max_tokens=320) for i in range(n)]
    ok = 0
    for gen in backend.generate(requests):
        try:
            parse_example(gen.text, schema_category)
            ok += 1
        except ParseError:
            pass
    return ok / n


def test_constrained_decoding_parses_even_for_a_random_model(random_lm):
    from synth.backends.transformers_backend import TransformersBackend

    constrained = TransformersBackend(str(random_lm), batch_size=25, constrained=True)
    rate = _parse_rate(constrained, 100)
    free = TransformersBackend(str(random_lm), batch_size=25, constrained=False)
    free_rate = _parse_rate(free, 25)
    print(f"\nrandom model: constrained parse rate {rate:.2f}, unconstrained {free_rate:.2f}")
    assert rate >= 0.99
    assert free_rate < 0.5


NUM_SHARDS = 3 * 3 * 2 // 2  # items / --shard-size


def _cmd(out, model):
    return [sys.executable, "-m", "synth.generate", "--out", str(out), "--model", str(model), "--seed", "3",
            "--categories", "short_short", "sts", "bitext", "--num-tasks", "3", "--examples-per-task", "2",
            "--shard-size", "2", "--max-tokens", "128", "--max-field-chars", "32", "--batch-size", "6",
            "--no-progress"]


def _run(out, model):
    return run_group(_cmd(out, model), dict(os.environ, HF_HUB_OFFLINE="1"), None, 600, "synth").stdout


def _kill_after_first_shard(out, model, timeout: float = 600) -> list[str]:
    """Start synth in its own session, SIGKILL its whole group from outside as soon as the first
    shard is finished on disk, and return the finished shards' names. Fails, rather than
    passing vacuously, if the run completed before it could be killed."""
    first = out / "stats" / "part000of001-00000.json"  # written last: marks the shard finished
    log = out.with_name(f"{out.name}.log")
    with open(log, "w") as handle:
        proc = subprocess.Popen(_cmd(out, model), env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"synth ended before the kill:\n{log.read_text()[-3000:]}"
            assert first.is_file(), "no shard finished in time"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return sorted(p.stem for p in (out / "stats").glob("*.json"))


def _records(out):
    rows = []
    for path in sorted((out / "shards").glob("*.jsonl")):
        rows += [json.loads(l) for l in path.read_text().splitlines() if l]
    return rows


def test_kill_and_resume_equals_an_uninterrupted_run(random_lm, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(straight, random_lm)
    done_before = _kill_after_first_shard(crashed, random_lm)
    print(f"\nkilled after {len(done_before)} of {NUM_SHARDS} shards")
    assert 1 <= len(done_before) < NUM_SHARDS, done_before  # killed mid-run, with work left to resume
    assert not json.loads((crashed / "manifest.json").read_text())["complete"]
    mtimes = {name: (crashed / "shards" / f"{name}.jsonl").stat().st_mtime_ns for name in done_before}
    _run(crashed, random_lm)
    assert {name: (crashed / "shards" / f"{name}.jsonl").stat().st_mtime_ns for name in done_before} == mtimes
    a, b = _records(straight), _records(crashed)
    assert a == b and len(a) > 0
    ids = [r["meta"]["id"] for r in b]
    assert len(ids) == len(set(ids))
    manifest = json.loads((crashed / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["complete"] and totals["generated"] == 3 * 3 * 2
    assert totals["accepted"] + totals["rejected"] == totals["generated"]
    assert totals["accepted"] == len(b)
    assert sum(totals["rejected_by_reason"].values()) == totals["rejected"]

"""synth on CPU with the built-in SmolLM2-135M-Instruct and the transformers backend: every
category, records the trainer reads, a manifest whose counts add up, a rejection table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmembed.data import read_jsonl

pytestmark = pytest.mark.integration
CATEGORIES = {"short_long", "long_short", "short_short", "long_long", "sts", "bitext"}


def test_cli_generates_every_category_on_cpu(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "synth.generate", "--out", str(out), "--num-tasks", "2",
                          "--examples-per-task", "1", "--max-tokens", "320", "--max-field-chars", "300",
                          "--no-progress"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rejected because" in run.stdout and "total rejected" in run.stdout
    records = []
    for shard in sorted((out / "shards").glob("*.jsonl")):
        records += read_jsonl(shard)  # the trainer's reader, unchanged
    assert {r.task for r in records} == CATEGORIES
    assert all(r.instruction for r in records)
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["complete"] and manifest["model"] == "default"
    assert totals["generated"] == 4 * 2 + 2 * 2
    assert totals["accepted"] + totals["rejected"] == totals["generated"]
    assert sum(totals["rejected_by_reason"].values()) == totals["rejected"]
    assert totals["accepted"] == len(records) == sum(totals["accepted_by_category"].values())
    assert sum(totals["generated_by_category"].values()) == totals["generated"]
    assert totals["tokens_out"] > 0 and totals["tokens_in"] > 0
    assert set(manifest["template_hashes"]) >= {f"example_{c}" for c in CATEGORIES}
    raw_ids = {json.loads(l)["id"] for p in (out / "raw").glob("*.jsonl") for l in p.read_text().splitlines()}
    assert {r.meta["id"] for r in records} <= raw_ids

"""The main job's own filter (launch/pipeline.py): cheap text checks on synthetic pairs before
the teacher's score filter, each rejection counted by reason."""

from __future__ import annotations

import importlib.util
import json
import sys

from .train_utils import REPO


def _pipeline():
    spec = importlib.util.spec_from_file_location("pipeline", REPO / "launch" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pipeline", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sanity_filter_drops_what_a_small_generator_writes_and_counts_it(tmp_path, capsys):
    good = {"query": "how do plants make food", "positive": "Plants make food by photosynthesis in their leaves."}
    rows = [
        good,
        {"query": "boolean", "positive": "true"},  # seen in a CI run of the 135M generator
        {"query": "what is 2+2 = ?", "positive": "2 + 2 = 4 ; 3 + 3 = 6 ; 4 + 4 = 8 ; 5 + 5 = 10"},
        {"query": "tell me about cats", "positive": "cats cats cats cats cats cats cats cats cats cats"},
        {"query": "the same text twice here", "positive": ["The same text twice here"]},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _pipeline().sanity_filter(source, target)
    kept = [json.loads(l) for l in target.read_text().splitlines()]
    assert kept == [good]
    out = capsys.readouterr().out
    assert "kept 1" in out and "'too_short': 1" in out and "'few_letters': 1" in out and "'repetitive': 1" in out

"""The main job for real: the default SmolLM2-135M + LoRA trained on a few hundred real
question/answer pairs (chatterbot-corpus, packaged) beats the untrained model on held-out
retrieval."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llmembed.data.packaged import main as make_data
from llmembed.serve.encoders import TextEncoder
from llmembed.evaluate import runner
from llmembed.model import EmbeddingModel

from .train_utils import REPO, launch, metrics

pytestmark = pytest.mark.integration


def test_lora_training_raises_heldout_retrieval(tmp_path):
    data = tmp_path / "data"
    assert make_data(["chatterbot", "--out", str(data)]) == 0
    train_rows = (data / "train.jsonl").read_text().splitlines()
    assert len(train_rows) >= 300
    overrides = [
        "--set", f"data.datasets=[{{path: {data / 'train.jsonl'}}}]",
        "--set", f"checkpoint.output_dir={tmp_path / 'run'}",
        "--set", "train.max_steps=24",
        "--set", "logging.progress_bar=false",
    ]
    launch(REPO / "launch" / "configs" / "quickstart.yaml", launcher="python", extra=overrides, timeout=1200)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    trained = EmbeddingModel.load(tmp_path / "run" / "final")
    untrained = EmbeddingModel.build(replace(trained.config, lora=None))
    heldout = [str(data / "heldout.jsonl")]
    (before,) = runner.run(TextEncoder.of(untrained, "untrained"), [], heldout).values()
    (after,) = runner.run(TextEncoder.of(trained, "trained"), [], heldout).values()
    print(f"\nheld-out untrained: {before}\nheld-out trained:   {after}\n"
          f"loss first 4 {losses[:4]} last 4 {losses[-4:]}")
    (tmp_path / "scores.json").write_text(json.dumps({"before": before, "after": after}))
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    assert after["mrr_at_10"] > before["mrr_at_10"] + 0.03
    assert after["recall_at_1"] > before["recall_at_1"]

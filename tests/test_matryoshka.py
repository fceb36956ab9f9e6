"""Matryoshka widths: recorded in the serving contract, served by encode(dim=...), written into
the export for sentence-transformers' truncate_dim and vLLM's dimensions, and scored by
``llmembed.evaluate --dim``. The loss itself is checked in test_losses.py, training in
test_train_cli.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmembed.losses import InfoNCE
from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.serve.export import export

from .conftest import perturb_trained_weights

TEXTS = ["what is the capital of France?", "Paris is the capital of France.", "Photosynthesis makes sugar."]


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, module_tmp):
    config = EmbeddingModelConfig(backbone=BackboneConfig(str(tiny_llama_dir), dtype="float32"),
                                  pooling=PoolingConfig("mean"), lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                                  matryoshka_dims=[16, 128])
    model = EmbeddingModel.build(config)
    perturb_trained_weights(model, seed=5)
    folder = module_tmp("matryoshka") / "model"
    model.save(folder)
    return folder


def test_encode_dim_is_the_renormalised_prefix_and_the_widths_survive_save_and_load(trained):
    model = EmbeddingModel.load(trained)
    assert model.contract.matryoshka_dims == [16, 128]
    full = model.encode(TEXTS, normalize=False)
    cut = model.encode(TEXTS, dim=16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert cut.shape == (3, 16) and np.abs(cut - expected).max() < 1e-6
    with pytest.raises(ValueError, match="dim=129: choose 1 to 128"):
        model.encode(TEXTS, dim=129)
    with pytest.raises(ValueError, match="exceed the embedding width"):
        EmbeddingModel.build(EmbeddingModelConfig(backbone=model.config.backbone, matryoshka_dims=[16, 256]))


def test_export_tells_sentence_transformers_and_vllm_the_widths(trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = export(trained, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["matryoshka_dimensions"] == [16, 128]
    assert "truncate_dim=16" in (out / "README.md").read_text()
    ours = EmbeddingModel.load(trained).encode(TEXTS, dim=16)
    served = SentenceTransformer(str(out), device="cpu", truncate_dim=16).encode(TEXTS)
    assert served.shape == (3, 16) and _cos(served, ours).min() >= 0.9999
    reloaded = EmbeddingModel.load(out)  # an export reads its widths back from the contract
    assert reloaded.contract.matryoshka_dims == [16, 128]


def test_evaluate_dim_scores_prefixes_under_their_own_name(trained, tmp_path):
    from llmembed.serve.encoders import EncoderError, load_encoder

    encoder = load_encoder(trained)
    cut = encoder.truncated(16)
    assert cut.name.endswith("@16d") and cut.fingerprint != encoder.fingerprint and cut.dim == 16
    queries = cut.encode_queries(TEXTS[:1], "Retrieve the answer")
    full = encoder.encode_queries(TEXTS[:1], "Retrieve the answer")
    assert queries.shape == (1, 16)
    assert np.allclose(queries, full[:, :16] / np.linalg.norm(full[:, :16]), atol=1e-6)
    with pytest.raises(EncoderError, match="outside its width"):
        encoder.truncated(500)


def test_a_width_sweep_encodes_each_text_once_and_scores_every_width(trained, tmp_path, capsys):
    from llmembed.serve.encoders import load_encoder
    from llmembed.evaluate.__main__ import main

    full, cut = load_encoder(trained).widths([None, 16])
    assert (full.dim, cut.dim) == (128, 16) and full.memo is cut.memo
    queries = full.encode_queries(TEXTS, "Retrieve the answer")
    passages = full.encode_passages(TEXTS)
    assert len(full.memo) == 6  # the same text as query and as passage is two vectors
    # The narrow view reads the full view's vectors: nothing new is encoded, and its vectors
    # are their re-normalised prefixes. A new instruction is new work.
    assert np.allclose(cut.encode_queries(TEXTS, "Retrieve the answer"),
                       queries[:, :16] / np.linalg.norm(queries[:, :16], axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(cut.encode_passages(TEXTS[::-1] + TEXTS[:1]),
                       _cut_rows(passages, [2, 1, 0, 0]), atol=1e-6)
    assert len(cut.memo) == 6
    cut.encode_queries(TEXTS[:1], ["Find the fact"])
    assert len(cut.memo) == 7
    # The CLI: one row per width, the memory shared within each model.
    records = tmp_path / "heldout.jsonl"
    records.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n"
                               for q, p in [(TEXTS[0], TEXTS[1]), ("how do plants make sugar?", TEXTS[2])]))
    scores = tmp_path / "scores.json"
    assert main(["--model", str(trained), "--data", str(records), "--dim", "16", "--dim", "full",
                 "--json", str(scores)]) == 0
    name = trained.parent.name  # a folder called "model" is named after its parent
    assert list(json.loads(scores.read_text())["scores"]) == [f"{name} @16d", name]
    with pytest.raises(SystemExit):
        main(["--model", str(trained), "--data", str(records), "--dim", "wide"])
    assert "expected a width >= 1 or 'full', got 'wide'" in capsys.readouterr().err


def _cut_rows(vectors, rows):
    picked = vectors[rows, :16]
    return picked / np.linalg.norm(picked, axis=1, keepdims=True)


def _train_prefix_losses(base, matryoshka_dims: list[int] | None, width: int, steps: int = 60) -> tuple[float, float]:
    """Train a tiny model on 16 pairs through the loss router (the trainer's loss path), then
    return the InfoNCE of the trained pairs at ``width`` dimensions and at full width."""
    import torch

    from llmembed.data.collate import LoadedDataset
    from llmembed.losses.matryoshka import prefix
    from llmembed.losses.router import LossConfig, LossRouter
    from llmembed.train.step import PairEncoder

    topics = ["river", "piano", "castle", "coffee", "robot", "desert", "bridge", "apple",
              "winter", "ocean", "train", "garden", "planet", "doctor", "forest", "guitar"]
    queries = [f"tell me about the {t}" for t in topics]
    passages = [f"This passage describes the {t} in some detail." for t in topics]
    config = EmbeddingModelConfig(backbone=BackboneConfig(str(base), dtype="float32"), pooling=PoolingConfig("mean"),
                                  lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    encoder = PairEncoder(EmbeddingModel.build(config))
    loss_config = LossConfig(temperature=0.05, matryoshka_dims=matryoshka_dims)
    loss = LossRouter([LoadedDataset("pairs", [], None, True, 1, InfoNCE)], loss_config)(0)
    plain = LossRouter([LoadedDataset("pairs", [], None, True, 1, InfoNCE)], LossConfig(temperature=0.05))(0)
    query, passage = encoder.model.tokenize(queries, is_query=True), encoder.model.tokenize(passages)
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(steps):
        q, p = encoder(query, passage)
        loss(q, p).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        q, p = encoder(query, passage)
        return plain(prefix(q, width), prefix(p, width)).loss.item(), plain(q, p).loss.item()


def test_matryoshka_training_makes_the_prefix_retrieve_where_plain_training_leaves_it_behind(tiny_llama_dir):
    """The same model, data, seed and steps; only loss.matryoshka_dims differs. The 8-dim
    prefix's loss on the trained pairs must end well below plain training's. (On this tiny random
    model the full width learns much more slowly under the Matryoshka sum than alone: plain
    reaches ~0.01, Matryoshka ~2.6 from 2.87 in 60 steps; the bench on the real default model,
    bench/matryoshka.py, measures what that costs.)"""
    untrained_prefix, untrained_full = _train_prefix_losses(tiny_llama_dir, None, 8, steps=0)
    plain_prefix, plain_full = _train_prefix_losses(tiny_llama_dir, None, 8)
    nested_prefix, nested_full = _train_prefix_losses(tiny_llama_dir, [8, 128], 8)
    print(f"InfoNCE @8d / full: untrained {untrained_prefix:.3f} / {untrained_full:.3f}, plain {plain_prefix:.3f} / "
          f"{plain_full:.3f}, Matryoshka {nested_prefix:.3f} / {nested_full:.3f}")
    assert plain_full < 0.1 * untrained_full and nested_full < untrained_full
    assert nested_prefix < 0.6 * plain_prefix < 0.6 * untrained_prefix

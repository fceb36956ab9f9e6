"""EmbeddingModel: encode invariances, truncation/normalisation, save/load, LoRA and 4-bit."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.backbone import BackboneError

from .conftest import perturb_trained_weights

QUERIES = ["what is the capital of France?", "how do plants make food", "x", "why is the sky blue at noon?"]
PASSAGES = ["Paris is the capital and largest city of France.", "Photosynthesis makes sugar from light.",
            "Rayleigh scattering favours short wavelengths, so the sky looks blue.", "ok"]


def _build(path, kind="last_token", lora=None, bidirectional=False, **kw):
    config = EmbeddingModelConfig(
        backbone=BackboneConfig(str(path), dtype="float32", bidirectional=bidirectional),
        pooling=PoolingConfig(kind, num_latents=8, num_heads=4),
        lora=lora,
        **kw,
    )
    model = EmbeddingModel.build(config)
    perturb_trained_weights(model, seed=1)
    return model


@pytest.mark.parametrize("kind", ("last_token", "mean", "latent_attention"))
def test_encode_is_order_batch_and_padding_side_invariant(tiny_llama_dir, kind):
    model = _build(tiny_llama_dir, kind)
    full = model.encode(PASSAGES, batch_size=8)
    one_by_one = np.concatenate([model.encode([p]) for p in PASSAGES])
    np.testing.assert_allclose(full, one_by_one, atol=1e-5)
    reordered = model.encode(PASSAGES[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(full, reordered, atol=1e-5)
    model.text_tokenizer.padding_side = "right" if model.text_tokenizer.padding_side == "left" else "left"
    np.testing.assert_allclose(full, model.encode(PASSAGES, batch_size=8), atol=1e-5)
    assert full.dtype == np.float32 and full.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


def test_queries_get_the_instruction_and_passages_do_not(tiny_llama_dir):
    model = _build(tiny_llama_dir)
    q = model.tokenize(["hello"], instruction="Find it")
    p = model.tokenize(["hello"])
    text = model.tokenizer.decode(q["input_ids"][0])
    assert text == "Instruct: Find it\nQuery: hello" + model.tokenizer.eos_token
    assert model.tokenizer.decode(p["input_ids"][0]) == "hello" + model.tokenizer.eos_token
    default = model.encode(["hello"], is_query=True)
    explicit = model.encode(["hello"], instruction=model.config.prompts.default_instruction)
    np.testing.assert_allclose(default, explicit, atol=1e-6)
    assert not np.allclose(default, model.encode(["hello"]), atol=1e-3)


def test_output_dim_truncates_before_normalising(tiny_llama_dir):
    model = _build(tiny_llama_dir, output_dim=32)
    out = model.encode(PASSAGES)
    assert out.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    raw = model.encode(PASSAGES, normalize=False)
    assert raw.shape == (4, 32)
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="output_dim"):
        _build(tiny_llama_dir, output_dim=4096)


@pytest.mark.parametrize("lora", (None, LoraSettings(r=4)))
@pytest.mark.parametrize("kind", ("last_token", "latent_attention"))
def test_save_load_round_trip(tiny_llama_dir, tmp_path, lora, kind):
    model = _build(tiny_llama_dir, kind, lora=lora, bidirectional=True)
    before = model.encode(QUERIES, instruction="Retrieve")
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / ("adapter" if lora else "backbone")).is_dir()
    loaded = EmbeddingModel.load(tmp_path / "m")
    assert loaded.bidirectional and loaded.contract == model.contract
    assert loaded.config.lora == model.config.lora and loaded.config.backbone == model.config.backbone
    np.testing.assert_allclose(loaded.encode(QUERIES, instruction="Retrieve"), before, atol=1e-5)


def test_lora_changes_outputs_and_only_adapters_train(tiny_llama_dir):
    base = _build(tiny_llama_dir)
    tuned = _build(tiny_llama_dir, lora=LoraSettings(r=4))
    trainable = [n for n, p in tuned.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-3] for n in trainable} == {"lora_A", "lora_B"}
    targets = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    diff = np.abs(base.encode(PASSAGES) - tuned.encode(PASSAGES)).max()
    assert diff > 1e-3


def test_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        EmbeddingModel.build(EmbeddingModelConfig(backbone=BackboneConfig("./no/such/folder")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="config.json"):
        EmbeddingModel.build(EmbeddingModelConfig(backbone=BackboneConfig(str(tmp_path / "empty"))))
    with pytest.raises(FileNotFoundError, match="llmembed_config.json"):
        EmbeddingModel.load(tmp_path / "empty")
    with pytest.raises(BackboneError, match="flash_attention_2"):
        EmbeddingModel.build(EmbeddingModelConfig(backbone=BackboneConfig("default", attn_implementation="flash_attention_2")))
    with pytest.raises(ValueError, match="attn_implementation"):
        BackboneConfig(attn_implementation="flash")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_four_bit_backbone_loads_and_encodes(tmp_path):
    from .conftest import save_tiny
    from llmembed.resolve import default_backbone_dir

    path = save_tiny(tmp_path / "tiny", "llama", default_backbone_dir(), vocab_size=49152, hidden_size=128,
                     heads=2, kv_heads=1)
    full = _build(path, "mean")
    quant = EmbeddingModel.build(EmbeddingModelConfig(
        backbone=BackboneConfig(str(path), dtype="float32", quantization="4bit"), pooling=PoolingConfig("mean"),
        lora=LoraSettings(r=4)))
    import bitsandbytes as bnb

    layers = [m for m in quant.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    a, b = full.encode(PASSAGES), quant.encode(PASSAGES)
    cos = (a * b).sum(1)
    assert np.all(cos > 0.9), cos  # 4-bit NF4 stays close to the fp32 weights


@pytest.mark.parametrize("kind,padding_side", [("mean", "right"), ("last_token", "left"), ("latent_attention", "right")])
def test_length_buckets_give_the_one_pass_embeddings_and_gradients(tiny_llama_dir, kind, padding_side):
    """PairEncoder's length buckets are a speed-up only: embeddings and LoRA gradients equal
    the single padded pass, for either padding side, with instruction prompts."""
    import torch

    from llmembed.train.step import PairEncoder, length_buckets

    model = _build(tiny_llama_dir, kind, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model.text_tokenizer.padding_side = padding_side
    long = "a long passage " * 20
    texts = ["ok", long, "Paris is the capital.", "x y", long + "and more", "Photosynthesis makes sugar."]
    query = model.tokenize(QUERIES[:3] * 2, instruction="Given a question, retrieve the answer")
    passage = model.tokenize(texts)
    results = []
    for buckets in (1, 3):
        encoder = PairEncoder(model, buckets)
        model.zero_grad()
        q, p = encoder(query, passage)
        (q @ p.T).logsumexp(dim=1).sum().backward()
        grads = [t.grad.clone() for t in model.parameters() if t.requires_grad]
        results.append((q.detach(), p.detach(), grads, encoder.processed_tokens))
    (q1, p1, g1, n1), (q3, p3, g3, n3) = results
    torch.testing.assert_close(q3, q1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p3, p1, atol=1e-5, rtol=1e-4)
    assert len(g1) == len(g3) > 0
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3)
    assert n1 == query["attention_mask"].numel() + passage["attention_mask"].numel()
    lengths = passage["attention_mask"].sum(1)
    assert n3 < n1 and [set(g.tolist()) for g in length_buckets(lengths, 2)] == [{1, 4}, {0, 2, 3, 5}]

"""GradCache (llmembed.train.grad_cache) on a tiny model in one process: the chunked,
cached backward gives the plain step's parameter gradients, with dropout on and with gradient
checkpointing; the DeepSpeed runs are in test_train_engine.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.losses.infonce import InfoNCELoss
from llmembed.train.grad_cache import cached_backward, split_chunks
from llmembed.train.step import PairEncoder

QUERIES = [f"question {i} about the {t}" for i, t in enumerate(
    ["river", "piano", "castle", "coffee", "robot", "desert", "bridge"])]
PASSAGES = [text for i, t in enumerate(["river", "piano", "castle", "coffee", "robot", "desert", "bridge"])
            for text in (f"An answer on the {t}, number {i}, in some detail.", f"Unrelated words {i}.")]


def _encoder(base, dropout: float, checkpointing: bool) -> PairEncoder:
    config = EmbeddingModelConfig(backbone=BackboneConfig(str(base), dtype="float32", attention_dropout=dropout),
                                  pooling=PoolingConfig("mean"), lora=LoraSettings(r=4, alpha=8, dropout=dropout))
    torch.manual_seed(0)
    model = EmbeddingModel.build(config, gradient_checkpointing=checkpointing)
    with torch.no_grad():  # LoRA B starts at zero: give it weights so every LoRA tensor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return PairEncoder(model, length_buckets=2)


def _batch(model: EmbeddingModel):
    return model.tokenize(QUERIES, is_query=True), model.tokenize(PASSAGES)


LOSS = InfoNCELoss(temperature=0.05)


def _grads(encoder: PairEncoder) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return grads


def _plain_chunked(encoder, query, passage, chunk, seed):
    """The plain step whose forwards run chunk by chunk (same order, so the same dropout masks)
    with the graph kept: one loss over the whole batch, one backward."""
    torch.manual_seed(seed)
    parts = [encoder(c.query, c.passage) for c in split_chunks(query, passage, chunk)]
    q, p = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    loss = LOSS(q, p, 2).loss
    loss.backward()
    return loss.detach(), _grads(encoder)


def _cached(encoder, query, passage, chunk, seed):
    torch.manual_seed(seed)
    out, _, _ = cached_backward(lambda a, b: encoder(a, b), split_chunks(query, passage, chunk),
                                lambda q, p: LOSS(q, p, 2), lambda s: s.backward(), torch.device("cpu"))
    return out.loss, _grads(encoder)


def _max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cached_gradients_equal_the_plain_steps_with_dropout_on(tiny_llama_dir, checkpointing):
    encoder = _encoder(tiny_llama_dir, dropout=0.1, checkpointing=checkpointing)
    query, passage = _batch(encoder.model)
    loss, plain = _plain_chunked(encoder, query, passage, chunk=3, seed=11)
    cached_loss, cached = _cached(encoder, query, passage, chunk=3, seed=11)  # chunks of 3, 3, 1 queries
    assert any("lora_A" in k for k in plain) and any("lora_B" in k for k in plain)
    assert abs(float(cached_loss - loss)) <= 1e-6
    assert _max_relative_error(cached, plain) <= 1e-5
    # Dropout really acts: another seed's masks give other gradients, so the replayed RNG matters.
    _, other = _plain_chunked(encoder, query, passage, chunk=3, seed=12)
    assert _max_relative_error(other, plain) > 1e-3


def test_without_dropout_any_chunking_gives_the_one_forward_steps_gradients(tiny_llama_dir):
    encoder = _encoder(tiny_llama_dir, dropout=0.0, checkpointing=False)
    query, passage = _batch(encoder.model)
    q, p = encoder(query, passage)  # the trainer's plain step: one forward of the whole batch
    loss = LOSS(q, p, 2).loss
    loss.backward()
    plain = _grads(encoder)
    for chunk in (1, 2, 7):
        cached_loss, cached = _cached(encoder, query, passage, chunk=chunk, seed=0)
        assert abs(float(cached_loss - loss)) <= 1e-6
        assert _max_relative_error(cached, plain) <= 1e-5, chunk


def test_the_global_rng_ends_where_the_first_pass_left_it(tiny_llama_dir):
    encoder = _encoder(tiny_llama_dir, dropout=0.1, checkpointing=False)
    query, passage = _batch(encoder.model)
    torch.manual_seed(5)
    with torch.no_grad():
        for c in split_chunks(query, passage, 4):
            encoder(c.query, c.passage)
    expected = torch.rand(3)
    _cached(encoder, query, passage, chunk=4, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cosent_through_the_cache_equals_the_plain_step(tiny_llama_dir):
    from llmembed.losses.cosent import CoSENTLoss

    encoder = _encoder(tiny_llama_dir, dropout=0.0, checkpointing=False)
    query = encoder.model.tokenize(QUERIES, is_query=True)
    passage = encoder.model.tokenize(PASSAGES[::2])  # one passage per query, graded
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 4.5])
    cosent = CoSENTLoss(scale=20.0)
    q, p = encoder(query, passage)
    loss = cosent(q, p, scores).loss
    loss.backward()
    plain = _grads(encoder)
    out, _, _ = cached_backward(lambda a, b: encoder(a, b), split_chunks(query, passage, 2),
                                lambda q, p: cosent(q, p, scores), lambda s: s.backward(), torch.device("cpu"))
    assert abs(float(out.loss - loss.detach())) <= 1e-6
    assert _max_relative_error(_grads(encoder), plain) <= 1e-5


def test_the_last_chunk_is_encoded_once_so_one_chunk_costs_the_plain_step(tiny_llama_dir):
    encoder = _encoder(tiny_llama_dir, dropout=0.1, checkpointing=False)
    query, passage = _batch(encoder.model)
    for chunk, chunks in ((3, 3), (7, 1)):
        calls: list[bool] = []  # whether each encode built a graph

        def encode(a, b):
            calls.append(torch.is_grad_enabled())
            return encoder(a, b)

        torch.manual_seed(3)
        cached_backward(encode, split_chunks(query, passage, chunk), lambda q, p: LOSS(q, p, 2),
                        lambda s: s.backward(), torch.device("cpu"))
        encoder.zero_grad(set_to_none=True)
        # chunks - 1 encodes without a graph, the last one with its graph kept, then the first
        # chunks - 1 again with graphs: 2 * chunks - 1 forwards instead of 2 * chunks.
        assert calls == [False] * (chunks - 1) + [True] * chunks, chunk


def _qlora_encoder(base, dropout: float, pack_tokens: int | None) -> PairEncoder:
    import bitsandbytes as bnb

    config = EmbeddingModelConfig(backbone=BackboneConfig(str(base), dtype="float32", quantization="4bit",
                                                          attention_dropout=dropout),
                                  pooling=PoolingConfig("mean"), lora=LoraSettings(r=4, alpha=8, dropout=dropout))
    torch.manual_seed(0)
    model = EmbeddingModel.build(config, gradient_checkpointing=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7  # 7 projections, 2 layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return PairEncoder(model, pack_tokens=pack_tokens)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_packed_and_checkpointed_through_the_cache_equals_the_plain_step(tmp_path, default_dir):
    """QLoRA (NF4 base), gradient checkpointing, dropout and padding-free forwards together: the
    cached step gives the plain step's LoRA gradients, and packing gives the padded ones."""
    from .conftest import save_tiny

    path = save_tiny(tmp_path / "tiny", "llama", default_dir, vocab_size=49152, hidden_size=128, heads=2, kv_heads=1)
    encoder = _qlora_encoder(path, dropout=0.1, pack_tokens=64)
    query, passage = _batch(encoder.model)
    loss, plain = _plain_chunked(encoder, query, passage, chunk=3, seed=11)
    cached_loss, cached = _cached(encoder, query, passage, chunk=3, seed=11)
    assert len(plain) == 2 * 7 * 2 and all("lora_" in k for k in plain)  # only the adapters learn
    assert abs(float(cached_loss - loss)) <= 1e-6
    assert _max_relative_error(cached, plain) <= 1e-5
    # Packing itself, with dropout off (packed rows draw other dropout masks than padded ones):
    # the same cached step, padded and packed, on identically built models.
    grads, tokens = [], []
    for pack_tokens in (None, 10_000):  # one row per side: no filler either
        encoder = _qlora_encoder(path, dropout=0.0, pack_tokens=pack_tokens)
        grads.append(_cached(encoder, query, passage, chunk=3, seed=11)[1])
        with torch.no_grad():
            encoder(query, passage)
        tokens.append(encoder.processed_tokens)
    real = int(query["attention_mask"].sum() + passage["attention_mask"].sum())
    assert tokens[1] == real < tokens[0]  # the packed forwards ran the real tokens only
    for name, grad in grads[0].items():
        assert (grads[1][name] - grad).norm() <= 1e-4 * grad.norm() + 1e-8, name

"""Padding-free forwards (llmembed.packing): packed rows with restarting position_ids give the
padded forward's embeddings and gradients, on every supported family, causal and
bidirectional (an explicit block mask), for each pooling, whatever the pack budget."""

from __future__ import annotations

import pytest
import torch

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.packing import pack, pack_rows

from .conftest import FAMILIES, perturb_trained_weights, save_tiny

TEXTS = ["a", "what is the capital of France?", "Paris is the capital and the largest city of France, "
         "on the Seine.", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.", "ok then"]


@pytest.fixture(scope="module")
def family_dirs(module_tmp, default_dir):
    return {f: save_tiny(module_tmp(f"pack-{f}"), f, default_dir, vocab_size=49152, hidden_size=64,
                         heads=2, kv_heads=1) for f in FAMILIES}


def _model(path, kind: str, bidirectional: bool, attn: str = "auto") -> EmbeddingModel:
    config = EmbeddingModelConfig(backbone=BackboneConfig(str(path), dtype="float32", bidirectional=bidirectional,
                                                          attn_implementation=attn),
                                  pooling=PoolingConfig(kind, num_latents=4, num_heads=2),
                                  lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = EmbeddingModel.build(config)
    perturb_trained_weights(model, seed=3)
    return model.eval()


def test_pack_rows_keeps_order_and_the_budget():
    assert pack_rows([3, 4, 2, 9, 1, 1], 7) == [[0, 1], [2], [3], [4, 5]]
    assert pack_rows([3, 4], 100) == [[0, 1]]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_rows_hold_every_real_token_once_with_restarting_positions(padding_side):
    if padding_side == "left":
        ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    else:
        ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0]])
    mask = (ids != 0).long()
    packed = pack(ids, mask, pack_tokens=6, filler_id=0)
    # Rows 0+1 (6 tokens) and row 2 (1 token, then 5 filler tokens, a block of their own).
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 0, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4]]
    assert packed.processed_tokens == 12
    hidden = packed.input_ids[..., None].float()  # "states" that are the token ids
    assert torch.equal(packed.unpack(hidden)[..., 0], ids.float())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,bidirectional,attn", [("last_token", False, "sdpa"), ("mean", False, "sdpa"),
                                                     ("latent_attention", False, "sdpa"), ("mean", True, "sdpa"),
                                                     ("last_token", True, "eager")])
def test_packed_embeddings_and_gradients_equal_the_padded_forwards(family_dirs, family, kind, bidirectional, attn):
    model = _model(family_dirs[family], kind, bidirectional, attn)
    assert model.bidirectional is bidirectional
    batch = model.tokenize(TEXTS)
    padded = model(**batch)
    for budget in (1, 24, 10_000):  # one text per row; a few per row with filler; all in one row
        packed = model(**batch, pack_tokens=budget)
        assert (packed - padded).abs().max() <= 2e-5, (family, kind, budget)
    # Gradients too (training runs this path), against the padded forward's.
    weights = torch.randn_like(padded)
    grads = []
    for budget in (None, 24):
        model.zero_grad(set_to_none=True)
        (model(**batch, pack_tokens=budget) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_B" in k for k in grads[0])
    for name, grad in grads[0].items():
        assert (grads[1][name] - grad).norm() <= 1e-4 * grad.norm() + 1e-8, (family, name)


def test_bidirectional_blocks_keep_packed_texts_apart_and_need_a_4d_mask_kernel(family_dirs):
    model = _model(family_dirs["llama"], "mean", bidirectional=True)
    batch = model.tokenize(TEXTS)
    alone = model(**model.tokenize(TEXTS[:1]))
    changed = model.tokenize(["b", *TEXTS[1:]])  # another first text, packed in the same row
    # Later texts in the row leave the first one's embedding alone, and another first text
    # leaves theirs alone: attention stays inside each text, in both directions.
    assert (model(**batch, pack_tokens=10_000)[:1] - alone).abs().max() <= 2e-5
    assert (model(**changed, pack_tokens=10_000)[1:] - model(**batch)[1:]).abs().max() <= 2e-5
    packed = pack(batch["input_ids"], batch["attention_mask"], 10_000)
    with pytest.raises(ValueError, match="needs sdpa or eager"):
        packed.block_mask("flash_attention_2", torch.float32)
    # The trainer refuses that combination when it builds its encoder, before any step runs
    # (flash-attention 2 is named on the config: this machine has no kernel to load).
    from llmembed.train.step import PairEncoder

    model.base_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs sdpa or eager"):
        PairEncoder(model, pack_tokens=64)
    assert PairEncoder(model).pack_tokens is None  # unpacked, the model's own masks serve


@pytest.mark.integration
def test_packed_training_steps_equal_padded_ones_with_grad_cache(tiny_llama_dir, tmp_path):
    """One DeepSpeed (ZeRO-2) process, 4 steps of 8 queries with 2 passages each: the padded
    run and the packed run (one row per side of each GradCache chunk of 3 queries) log the same
    losses and gradient norms, and the packed run processes no padding at all."""
    from .train_utils import launch, metrics, write_config, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs = {}
    for name, train, loss in (("padded", {}, {}), ("packed", {"pack_tokens": 512}, {"grad_cache_chunk": 3})):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_llama_dir, [data], loss=loss,
                              train={"per_device_batch_size": 8, "max_steps": 4, **train})
        launch(config)
        runs[name] = metrics(tmp_path / name / "run")
    for a, b in zip(runs["packed"], runs["padded"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (runs["packed"], runs["padded"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"]
    padded_share, packed_share = runs["padded"][-1]["padding_share"], runs["packed"][-1]["padding_share"]
    assert packed_share == 0.0 and padded_share > 0.05, (packed_share, padded_share)

    (tmp_path / "bad").mkdir()
    config = write_config(tmp_path / "bad", tiny_llama_dir, [data], train={"pack_tokens": 48, "length_buckets": 2})
    run = launch(config, launcher="python", check=False)
    assert run.returncode != 0 and "set length_buckets: 1" in run.stdout and "Traceback" not in run.stdout

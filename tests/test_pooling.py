"""Pooling modules on token states: EOS selection, pad and instruction exclusion, save/load."""

from __future__ import annotations

import pytest
import torch

from llmembed.backbone import load_tokenizer
from llmembed.pooling import PoolingConfig, build_pooling, content_mask
from llmembed.serving import ServingContract
from llmembed.tokenization import EmbeddingTokenizer

WIDTH = 16


def _randomise(pooling):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pooling.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return pooling


@pytest.fixture(scope="module")
def tokenizer(default_dir):
    return load_tokenizer(str(default_dir))


@pytest.mark.parametrize("side", ("left", "right"))
def test_last_token_picks_the_appended_eos(tokenizer, side):
    tok = EmbeddingTokenizer(tokenizer, ServingContract(append_eos=True, padding_side=side))
    batch = tok(["short", "a much longer text with many more tokens in it", "mid length text"], max_length=64)
    hidden = torch.randn(*batch["input_ids"].shape, WIDTH)
    pooled = build_pooling(PoolingConfig("last_token"), WIDTH)(hidden, batch["attention_mask"])
    for i in range(3):
        real = batch["attention_mask"][i].nonzero().flatten()
        last = real.max().item()
        assert batch["input_ids"][i, last].item() == tokenizer.eos_token_id
        assert torch.equal(pooled[i], hidden[i, last])
    if side == "left":
        assert batch["attention_mask"][0, 0].item() == 0 and batch["attention_mask"][0, -1].item() == 1
    else:
        assert batch["attention_mask"][0, 0].item() == 1 and batch["attention_mask"][0, -1].item() == 0


@pytest.mark.parametrize("kind", ("mean", "latent_attention"))
@pytest.mark.parametrize("side", ("left", "right"))
def test_pads_are_excluded(kind, side):
    pooling = _randomise(build_pooling(PoolingConfig(kind, num_latents=4, num_heads=2), WIDTH)).eval()
    real = torch.randn(1, 5, WIDTH)
    pad_states = torch.randn(1, 3, WIDTH) * 100
    padded = torch.cat([pad_states, real], 1) if side == "left" else torch.cat([real, pad_states], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]) if side == "left" else torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    alone = pooling(real, torch.ones(1, 5, dtype=torch.long))
    assert torch.allclose(pooling(padded, mask), alone, atol=1e-5)
    if kind == "mean":
        assert torch.allclose(alone, real.mean(1), atol=1e-6)


@pytest.mark.parametrize("kind", ("mean", "latent_attention"))
@pytest.mark.parametrize("side", ("left", "right"))
def test_instruction_tokens_excluded_when_asked(kind, side):
    """Rows whose instruction part differs (in content and length) pool to the same vector
    when instructions are excluded, and to different ones when included."""
    torch.manual_seed(0)
    text = torch.randn(4, WIDTH)
    instr_a, instr_b = torch.randn(3, WIDTH), torch.randn(6, WIDTH)
    rows = [torch.cat([instr_a, text]), torch.cat([instr_b, text])]
    length = max(len(r) for r in rows)
    hidden = torch.zeros(2, length, WIDTH)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        hidden[i, span] = r
        mask[i, span] = 1
    prompt_lengths = torch.tensor([3, 6])
    excl = _randomise(build_pooling(PoolingConfig(kind, include_instruction=False, num_latents=4, num_heads=2), WIDTH))
    out = excl(hidden, mask, prompt_lengths)
    assert torch.allclose(out[0], out[1], atol=1e-5)
    if kind == "mean":
        assert torch.allclose(out[0], text.mean(0), atol=1e-6)
    incl = build_pooling(PoolingConfig(kind, include_instruction=True, num_latents=4, num_heads=2), WIDTH)
    incl.load_state_dict(excl.state_dict())
    out = incl(hidden, mask, prompt_lengths)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_prompt_covering_the_whole_text_leaves_nothing_as_in_sentence_transformers():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    kept = content_mask(mask, torch.tensor([10, 2]))
    assert kept.tolist() == [[False, False, False, False], [False, False, False, True]]
    pooled = build_pooling(PoolingConfig("mean", include_instruction=False), WIDTH)(
        torch.randn(2, 4, WIDTH), mask, torch.tensor([10, 2]))
    assert torch.equal(pooled[0], torch.zeros(WIDTH)) and pooled[1].abs().sum() > 0


def test_untrained_latent_head_equals_mean_pooling():
    hidden, mask = torch.randn(2, 7, WIDTH), torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    latent = build_pooling(PoolingConfig("latent_attention", num_latents=4, num_heads=2), WIDTH)
    mean = build_pooling(PoolingConfig("mean"), WIDTH)
    assert torch.allclose(latent(hidden, mask), mean(hidden, mask), atol=1e-6)


@pytest.mark.parametrize("kind", ("last_token", "mean", "latent_attention"))
def test_weights_round_trip(tmp_path, kind):
    """Heads save only weights (their config is part of the serving contract)."""
    config = PoolingConfig(kind, num_latents=4, num_heads=2)
    pooling = _randomise(build_pooling(config, WIDTH))
    pooling.save_weights(tmp_path / "pooling")
    assert (tmp_path / "pooling" / "model.safetensors").is_file() is (kind == "latent_attention")
    loaded = build_pooling(config, WIDTH)
    loaded.load_weights(tmp_path / "pooling")
    hidden, mask = torch.randn(2, 5, WIDTH), torch.tensor([[1] * 5, [0, 1, 1, 1, 1]])
    assert torch.equal(loaded(hidden, mask), pooling(hidden, mask))
    if kind == "latent_attention":
        with pytest.raises(FileNotFoundError, match="weights are missing"):
            build_pooling(config, WIDTH).load_weights(tmp_path / "nothing")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="pooling.kind"):
        PoolingConfig("cls")
    with pytest.raises(ValueError, match="include_instruction"):
        PoolingConfig("last_token", include_instruction=False)
    with pytest.raises(ValueError, match="num_heads"):
        build_pooling(PoolingConfig("latent_attention", num_heads=5), WIDTH)

"""Bidirectional attention via config.is_causal on every supported family and attention
implementation; pads never leak into real tokens."""

from __future__ import annotations

import pytest
import torch

from llmembed.backbone import BackboneConfig, is_bidirectional, load_backbone, set_bidirectional

from .conftest import FAMILIES, save_tiny

IMPLEMENTATIONS = ("sdpa", "eager")


@pytest.fixture(scope="module")
def family_dirs(module_tmp):
    return {f: save_tiny(module_tmp(f"tiny-{f}"), f) for f in FAMILIES}


def _hidden(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_later_token_changes_earlier_state_only_when_bidirectional(family_dirs, family, attn):
    path = str(family_dirs[family])
    ids = torch.tensor([[5, 17, 33, 48, 71, 90, 12, 7]])
    changed = ids.clone()
    changed[0, -1] = 200
    for bidirectional in (False, True):
        model = load_backbone(BackboneConfig(path, dtype="float32", attn_implementation=attn,
                                             bidirectional=bidirectional), path).eval()
        assert is_bidirectional(model) is bidirectional
        a, b = _hidden(model, ids), _hidden(model, changed)
        first_diff = (a[0, 0] - b[0, 0]).abs().max().item()
        if bidirectional:
            assert first_diff > 1e-4, f"{family}/{attn}: bidirectional but token 0 ignores the last token"
        else:
            assert first_diff < 1e-6, f"{family}/{attn}: causal but token 0 sees the last token ({first_diff})"
        # The last position always sees the change.
        assert (a[0, -1] - b[0, -1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("side", ("left", "right"))
def test_pads_never_change_real_token_states(family_dirs, family, attn, bidirectional, side):
    path = str(family_dirs[family])
    model = load_backbone(BackboneConfig(path, dtype="float32", attn_implementation=attn,
                                         bidirectional=bidirectional), path).eval()
    short = torch.tensor([9, 21, 34, 55, 2])
    long = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 2])
    alone = _hidden(model, short.unsqueeze(0))[0]
    pad = torch.full((len(long) - len(short),), 0)
    row = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask = (torch.arange(len(long)) >= len(pad)) if side == "left" else (torch.arange(len(long)) < len(short))
    ids = torch.stack([row, long])
    masks = torch.stack([mask.long(), torch.ones(len(long), dtype=torch.long)])
    batched = _hidden(model, ids, masks)[0][mask]
    assert torch.allclose(batched, alone, atol=1e-5), (batched - alone).abs().max()
    # Different pad ids must not matter either.
    ids2 = ids.clone()
    ids2[0][~mask] = 77
    batched2 = _hidden(model, ids2, masks)[0][mask]
    assert torch.allclose(batched2, alone, atol=1e-5)


def test_switch_round_trips_through_config_json(family_dirs, tmp_path):
    from transformers import AutoModel

    path = str(family_dirs["qwen2"])
    model = load_backbone(BackboneConfig(path, dtype="float32", bidirectional=True), path)
    model.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).config.is_causal is False
    set_bidirectional(model, False)
    model.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).config.is_causal is True

"""LLM2Vec's masked next-token prediction: the masking rule, and the loss against the one a
Hugging Face causal LM computes itself on the same masked input (bidirectional attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmembed.data.collate import LoadedDataset
from llmembed.data.masking import IGNORE, mask_tokens
from llmembed.losses import MNTP, LossConfig, LossParts, LossRouter
from llmembed.losses.mntp import MNTPHead, mask_token_id, output_embeddings
from llmembed.train.step import PairEncoder

from .conftest import save_tiny


def test_masking_chooses_real_non_special_tokens_after_a_real_one_80_10_10():
    ids = torch.randint(10, 1000, (64, 40))
    mask = torch.ones_like(ids)
    mask[::2, :6] = 0  # left padding on every other row
    ids[::2, :6] = 0
    ids[:, -1] = 2  # EOS, special
    rngs = [np.random.default_rng([7, row]) for row in range(64)]
    masked, labels = mask_tokens(ids, mask, {0, 2}, 3, 1000, 0.2, rngs)
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert not chosen[:, 0].any() and not chosen[::2, :7].any() and not chosen[:, -1].any()
    share = chosen.sum().item() / (32 * 37 + 32 * 32)
    assert 0.17 < share < 0.23, share
    replaced = masked[chosen]
    to_mask = (replaced == 3).float().mean().item()
    kept = (replaced == ids[chosen]).float().mean().item()
    assert 0.75 < to_mask < 0.85 and 0.06 < kept < 0.14, (to_mask, kept)
    again, _ = mask_tokens(ids, mask, {0, 2}, 3, 1000, 0.2, [np.random.default_rng([7, row]) for row in range(64)])
    assert torch.equal(again, masked)  # seeded per row: resumable, rank-independent


@pytest.mark.parametrize("tied", [False, True])
def test_mntp_loss_is_the_causal_lms_own_shifted_loss_with_bidirectional_attention(tmp_path, default_dir, tied):
    from transformers import AutoModelForCausalLM

    from llmembed.backbone import BackboneConfig
    from llmembed.model import EmbeddingModel, EmbeddingModelConfig
    from llmembed.pooling import PoolingConfig

    folder = save_tiny(tmp_path / "tiny", "llama", default_dir, vocab_size=49152, hidden_size=64, heads=4,
                       kv_heads=2)
    if tied:  # tie the embeddings, as SmolLM2 does
        lm = AutoModelForCausalLM.from_pretrained(folder)
        lm.config.tie_word_embeddings = True
        lm.tie_weights()
        lm.save_pretrained(folder)
    model = EmbeddingModel.build(EmbeddingModelConfig(
        backbone=BackboneConfig(name_or_path=str(folder), dtype="float32", bidirectional=True),
        pooling=PoolingConfig(kind="mean")))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference.config.is_causal = False
    head = output_embeddings(model.base_model, folder)
    assert torch.equal(head, reference.get_output_embeddings().weight.detach())
    inputs = model.tokenize(["A sentence about rivers and their banks.", "Short one."], is_query=False)
    tokenizer = model.tokenizer
    masked, labels = mask_tokens(inputs["input_ids"], inputs["attention_mask"], set(tokenizer.all_special_ids),
                                 mask_token_id(tokenizer, "_"), len(tokenizer), 0.4,
                                 [np.random.default_rng([1, r]) for r in range(2)])
    assert (labels != IGNORE).sum() >= 2
    model.eval()
    # The training path: the pair encoder gives token states without passages, the router scores them.
    datasets = [LoadedDataset("wiki", [], None, True, 1, MNTP)]
    states = PairEncoder(model)({"input_ids": masked, "attention_mask": inputs["attention_mask"]})
    loss = LossRouter(datasets, LossConfig(), [LossParts(head=MNTPHead(head))])(0)(states, labels).loss
    want = reference(input_ids=masked, attention_mask=inputs["attention_mask"], labels=labels).loss
    assert abs(loss.item() - want.item()) < 1e-4, (loss.item(), want.item())
    with pytest.raises(ValueError, match="wiki trains MNTP"):
        LossRouter(datasets, LossConfig())

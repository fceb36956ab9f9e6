"""Masked next-token prediction: LLM2Vec's first step (BehnamGhader et al., 2024, "LLM2Vec: Large
Language Models Are Secretly Powerful Text Encoders", arXiv 2404.05961).

A decoder switched to bidirectional attention (``model.backbone.bidirectional``) has never seen
the future tokens it now attends to; LLM2Vec adapts it with a masked-LM objective that keeps
the causal model's output layout: some input tokens are masked (BERT's 80% mask token, 10%
random, 10% kept) and token ``i`` is predicted from the hidden state at position ``i - 1``,
through the model's own (frozen) output embeddings. Only masked positions count.

The masking is drawn per text from ``(seed, epoch, dataset, row)`` in the collator, like every
other random choice of a batch, so runs resume exactly and ranks agree with one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: set[int], mask_id: int,
                vocab_size: int, probability: float, rngs: list[np.random.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked inputs, labels) for a padded batch, one generator per row. A position can be
    chosen when it and the one before it are real tokens (its prediction is read there) and it
    is no special token; each chosen one is replaced by ``mask_id`` (80%), a random token
    (10%) or kept (10%), and its label is the original token; the rest are labelled ignore."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE)
    special = torch.tensor(sorted(special_ids), dtype=input_ids.dtype)
    for row, rng in enumerate(rngs):
        real = attention_mask[row].bool()
        eligible = real.clone()
        eligible[0] = False
        eligible[1:] &= real[:-1]
        eligible &= ~torch.isin(input_ids[row], special)
        positions = eligible.nonzero().flatten().tolist()
        chosen = [p for p, draw in zip(positions, rng.random(len(positions))) if draw < probability]
        if not chosen and positions:  # every text teaches something
            chosen = [positions[int(rng.integers(len(positions)))]]
        for position in chosen:
            labels[row, position] = input_ids[row, position]
            action = rng.random()
            if action < 0.8:
                masked[row, position] = mask_id
            elif action < 0.9:
                masked[row, position] = int(rng.integers(vocab_size))
    return masked, labels


def mask_token_id(tokenizer, mask_token: str) -> int:
    """The tokenizer's own mask token, else ``mask_token`` (LLM2Vec uses "_"), which must be
    one token."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"loss.mntp_mask_token {mask_token!r} is {len(ids)} tokens for this tokenizer; pick one token")
    return int(ids[0])


def output_embeddings(base_model: nn.Module, folder: str | Path) -> torch.Tensor:
    """The causal LM's output projection (vocab x hidden), detached: the input embeddings when
    tied, else ``lm_head.weight`` read from the checkpoint (the bare transformer drops it)."""
    config = base_model.config
    if getattr(config, "tie_word_embeddings", False):
        return base_model.get_input_embeddings().weight.detach()
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = ([folder / json.loads(index.read_text())["weight_map"]["lm_head.weight"]] if index.is_file()
             else sorted(folder.glob("*.safetensors")))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if "lm_head.weight" in handle.keys():
                return handle.get_tensor("lm_head.weight").to(base_model.get_input_embeddings().weight.dtype)
    raise ValueError(f"{folder}: no lm_head.weight in its safetensors files, and the embeddings are not tied: "
                     "MNTP needs the model's output layer")


class MNTPHead(nn.Module):
    """Scores hidden states against the frozen output embeddings at masked positions only (a
    full vocabulary projection of every position would cost far more memory)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of predicting ``labels[:, i]`` from ``hidden[:, i - 1]``."""
        targets = labels[:, 1:]
        chosen = targets != IGNORE
        if not chosen.any():
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        logits = hidden[:, :-1][chosen].float() @ self.weight.float().T
        loss = F.cross_entropy(logits, targets[chosen])
        accuracy = (logits.argmax(dim=-1) == targets[chosen]).float().mean()
        return loss, accuracy.detach()

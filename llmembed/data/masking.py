"""Token masking for masked next-token prediction (LLM2Vec's MNTP, :mod:`llmembed.losses.mntp`).

Masking is part of making a batch, like sampling negatives: it is drawn per text from
``(seed, epoch, dataset, row)`` in the collator, so runs resume exactly and ranks agree with
one process. The loss only scores the labels this module writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # the label of a position that is not scored


@dataclass
class TokenMasking:
    """How a token-level dataset masks its texts: the mask token, the vocabulary random
    replacements come from, the share of eligible tokens masked, tokens never masked."""

    mask_id: int
    vocab_size: int
    probability: float
    special_ids: set[int]


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

"""Masked next-token prediction: LLM2Vec's first step (BehnamGhader et al., 2024, "LLM2Vec: Large
Language Models Are Secretly Powerful Text Encoders", arXiv 2404.05961).

A decoder switched to bidirectional attention (``model.backbone.bidirectional``) has never seen
the future tokens it now attends to; LLM2Vec adapts it with a masked-LM objective that keeps
the causal model's output layout: some input tokens are masked (BERT's 80% mask token, 10%
random, 10% kept) and token ``i`` is predicted from the hidden state at position ``i - 1``,
through the model's own (frozen) output embeddings. Only masked positions count.

The masking is drawn in the collator (:mod:`llmembed.data.masking`), like every other random
choice of a batch; this module holds the loss: the head that scores masked positions and the
dataset loss that declares what MNTP needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmembed.backbone import resolve_backbone_path
from llmembed.config import bounded, check_ranges
from llmembed.data.collate import BatchShape, LoadedDataset
from llmembed.data.masking import IGNORE, TokenMasking
from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings
from llmembed.model import EmbeddingModel


def mask_token_id(tokenizer, mask_token: str) -> int:
    """The tokenizer's own mask token, else ``mask_token`` (LLM2Vec uses "_"), which must be
    one token."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"loss.mntp.mask_token {mask_token!r} is {len(ids)} tokens for this tokenizer; pick one token")
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


@dataclass
class MNTPSettings:
    """``loss.mntp``."""

    # Share of eligible tokens masked (LLM2Vec's 0.2).
    probability: float = bounded(0.2, gt=0.0, lt=1.0)
    # The mask token for tokenizers without one (LLM2Vec uses "_" for Llama and Mistral).
    mask_token: str = "_"

    def __post_init__(self) -> None:
        check_ranges(self)


class MNTP(DatasetLoss):
    """Masked next-token prediction on plain ``{"text"}`` records, scored on token states
    through the model's frozen output embeddings. Never picked by ``loss: auto`` (it adapts a
    model to bidirectional attention rather than teaching it embeddings)."""

    name = "mntp"
    batch_shape = BatchShape.TOKENS
    text_only = True
    settings_class = MNTPSettings

    @classmethod
    def prepare(cls, model: EmbeddingModel, settings: MNTPSettings, zero_stage: int, dataset: str) -> LossParts:
        if not model.bidirectional:
            raise ValueError(f"dataset {dataset} trains MNTP, which adapts a model to bidirectional attention: set "
                             "model.backbone.bidirectional: true")
        if zero_stage == 3:
            raise ValueError(f"dataset {dataset} trains MNTP, which reads the whole output embeddings: use "
                             "train.deepspeed=zero2")
        head = MNTPHead(output_embeddings(model.base_model, resolve_backbone_path(model.config.backbone.name_or_path)))
        tokenizer = model.tokenizer
        masking = TokenMasking(mask_token_id(tokenizer, settings.mask_token), len(tokenizer), settings.probability,
                               set(tokenizer.all_special_ids))
        return LossParts(head, masking)

    def __init__(self, dataset: LoadedDataset, config: LossSettings, settings: MNTPSettings,
                 parts: LossParts) -> None:
        super().__init__(dataset, config, settings, parts)
        if parts.head is None:
            raise ValueError(f"dataset {dataset.name} trains MNTP: its loss needs the model's MNTP head "
                             "(MNTP.prepare)")
        self.head = parts.head

    def __call__(self, states: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        return LossOutput(*self.head(states, labels))

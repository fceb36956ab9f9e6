"""One optimizer step of contrastive training.

We own this step (and not a stock ``Trainer.training_step``) because the loss needs the
whole global batch: queries and passages are encoded separately, the loss gathers embeddings
across ranks with gradients, and the loss itself depends on the dataset the batch came from
(asked of the :class:`~llmembed.losses.LossRouter`). DeepSpeed does the rest: ``backward``
scales for accumulation, ``step`` applies the optimizer and LR schedule at the accumulation
boundary, clips and keeps bf16 master weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmembed.data.sampling import BatchRef
from llmembed.distributed import all_reduce_mean
from llmembed.losses.router import LossRouter
from llmembed.model import EmbeddingModel


class PairEncoder(nn.Module):
    """What DeepSpeed wraps: one forward encodes a query batch and a passage batch, so ZeRO-3
    gathers each layer's weights once per micro-batch for both."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, query: dict, passage: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(**query), self.model(**passage)


@dataclass
class StepStats:
    """One optimizer step. ``loss``/``accuracy`` are means over ranks and micro-batches; the
    counts are this rank's (padded tokens are what the model processed)."""

    loss: float
    accuracy: float
    grad_norm: float
    samples: int
    padded_tokens: int
    real_tokens: int


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def optimizer_step(engine: Any, batches: Iterator[BatchRef], collate: Callable[[BatchRef], dict],
                   losses: LossRouter, accumulation: int) -> StepStats:
    """Run ``accumulation`` micro-batches through forward, loss and backward; DeepSpeed steps
    the optimizer after the last one. Collective: every rank calls it once per step."""
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    accuracy_sum = torch.zeros((), device=device)
    samples = padded = real = 0
    for _ in range(accumulation):
        batch = collate(next(batches))
        query, passage = _to(batch["query"], device), _to(batch["passage"], device)
        q, p = engine(query, passage)
        scores = batch["scores"].to(device) if "scores" in batch else None
        out = losses(batch["dataset"])(q, p, scores)
        engine.backward(out.loss)
        engine.step()
        loss_sum += out.loss.detach() / accumulation
        accuracy_sum += out.accuracy / accumulation
        samples += query["input_ids"].shape[0]
        padded += int(query["attention_mask"].numel() + passage["attention_mask"].numel())
        real += int(query["attention_mask"].sum() + passage["attention_mask"].sum())
    # One all-reduce for both means (a collective every rank reaches at the same step).
    loss, accuracy = all_reduce_mean(torch.stack([loss_sum, accuracy_sum])).tolist()
    grad_norm = engine.get_global_grad_norm()
    return StepStats(loss, accuracy, float(grad_norm) if grad_norm is not None else float("nan"),
                     samples, padded, real)

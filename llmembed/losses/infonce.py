"""InfoNCE over in-batch and hard negatives, optionally across devices.

van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"
(arXiv 1807.03748); the in-batch + hard-negative form used for dense retrieval by Karpukhin et
al., 2020 (DPR, arXiv 2004.04906) and for LLM embedders by Wang et al., 2024 (E5-mistral,
arXiv 2401.00368), at temperature 0.02.

Passages arrive grouped per query: ``[pos_0, neg_0_1, ..., pos_1, ...]`` with ``group_size``
rows each. With cross-device negatives every rank's groups are gathered (with gradients) and
query ``i`` of rank ``r`` is labelled with column ``(r * B + i) * group_size``: its own
positive, never another rank's row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmembed.distributed import gather_with_grad, world


@dataclass
class LossOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor  # share of queries whose positive scores highest


class InfoNCELoss:
    def __init__(self, temperature: float = 0.02, symmetric: bool = False, cross_device: bool = True) -> None:
        if temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.cross_device = cross_device

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, group_size: int,
                 in_batch_negatives: bool = True) -> LossOutput:
        local = queries.shape[0]
        if passages.shape[0] != local * group_size:
            raise ValueError(f"{passages.shape[0]} passages for {local} queries x group {group_size}")
        rank, size = world()
        if self.cross_device and size > 1:
            all_queries, all_passages, offset = gather_with_grad(queries), gather_with_grad(passages), rank * local
        else:
            all_queries, all_passages, offset = queries, passages, 0
        rows = torch.arange(local, device=queries.device) + offset
        labels = rows * group_size
        scores = queries.float() @ all_passages.float().T / self.temperature
        if not in_batch_negatives:
            # Only the query's own group competes (classification-style data).
            group_of_column = torch.arange(all_passages.shape[0], device=scores.device) // group_size
            scores = scores.masked_fill(group_of_column.unsqueeze(0) != rows.unsqueeze(1), float("-inf"))
        loss = F.cross_entropy(scores, labels)
        accuracy = (scores.argmax(dim=1) == labels).float().mean()
        if self.symmetric:
            # Positive passage -> its query, against all queries in the (gathered) batch.
            positives = passages[::group_size]
            reverse = positives.float() @ all_queries.float().T / self.temperature
            if not in_batch_negatives:
                eye = torch.zeros_like(reverse, dtype=torch.bool)
                eye[torch.arange(local), rows] = True
                reverse = reverse.masked_fill(~eye, float("-inf"))
            loss = (loss + F.cross_entropy(reverse, rows)) / 2
        return LossOutput(loss, accuracy.detach())

"""InfoNCE over in-batch and hard negatives, optionally across devices.

van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"
(arXiv 1807.03748); the in-batch + hard-negative form used for dense retrieval by Karpukhin et
al., 2020 (DPR, arXiv 2004.04906) and for LLM embedders by Wang et al., 2024 (E5-mistral,
arXiv 2401.00368), at temperature 0.02.

Passages arrive grouped per query: ``[pos_0, neg_0_1, ..., pos_1, ...]`` with ``group_size``
rows each. With cross-device negatives every rank's groups are gathered (with gradients) and
query ``i`` of rank ``r`` is labelled with column ``(r * B + i) * group_size``: its own
positive, never another rank's row.

False-negative masking (``false_negative_margin``): a negative, in-batch or hard, whose cosine
with the query exceeds the positive's by more than the margin is most likely an unlabelled
positive (a duplicate answer, a paraphrase); it leaves the softmax's denominator instead of
being pushed away. This is the in-loss counterpart of mining's positive-aware rule, in the
spirit of GISTEmbed (Solatorio, 2024, arXiv 2402.16829), with the student as its own guide.
With a ``guide`` (an embedding teacher's vectors of the same texts, ``loss.guided_masking``)
GISTEmbed's own rule applies as well: a candidate the teacher scores above the query's
positive leaves the denominator.

Cross-rank balancing (``shared_queries``, Conan-embedding, Li et al., 2024, arXiv 2408.15710):
instead of each rank bringing its own queries, all ranks hold the same queries and positives
and bring distinct hard negatives, so a query meets ``ranks x (group_size - 1)`` hard negatives
at the memory cost of ``group_size - 1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmembed.data.collate import LoadedDataset
from llmembed.data.schema import RecordFacts
from llmembed.distributed import gather_with_grad, world
from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings, TeacherSignals
from llmembed.losses.distill import KLDistillLoss
from llmembed.losses.structure import SimilarityStructureLoss


class InfoNCELoss:
    def __init__(self, temperature: float = 0.02, symmetric: bool = False, cross_device: bool = True,
                 false_negative_margin: float | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.cross_device = cross_device
        self.false_negative_margin = false_negative_margin

    def _logits(self, cosines: torch.Tensor, labels: torch.Tensor, competing: torch.Tensor | None,
                guide: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Temperature-scaled logits where only ``competing`` columns (all when None) face
        the label, false negatives masked out; and how many competing columns were masked.
        ``guide``: a teacher's cosines of the same pairs; a column it scores above the label's
        column is masked too (GISTEmbed)."""
        excluded = torch.zeros_like(cosines, dtype=torch.bool) if competing is None else ~competing
        masked = 0
        if self.false_negative_margin is not None or guide is not None:
            with torch.no_grad():
                suspect = torch.zeros_like(excluded)
                if self.false_negative_margin is not None:
                    positive = cosines.gather(1, labels.unsqueeze(1))
                    suspect |= cosines > positive + self.false_negative_margin
                if guide is not None:
                    guide = guide.to(cosines.device)
                    suspect |= guide > guide.gather(1, labels.unsqueeze(1))
                suspect &= ~excluded
                suspect[torch.arange(len(labels), device=labels.device), labels] = False
            masked = int(suspect.sum())
            excluded = excluded | suspect
        return (cosines / self.temperature).masked_fill(excluded, float("-inf")), masked

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, group_size: int,
                 in_batch_negatives: bool = True, shared_queries: bool = False,
                 guide: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
        """``guide``: a teacher's embeddings of the same queries and passages (normalised); every
        candidate it scores above the query's positive leaves the denominator (GISTEmbed)."""
        local = queries.shape[0]
        if passages.shape[0] != local * group_size:
            raise ValueError(f"{passages.shape[0]} passages for {local} queries x group {group_size}")
        rank, size = world()
        if shared_queries and self.cross_device and size > 1:
            return self._balanced(queries, passages, group_size, in_batch_negatives, size, guide)
        guide_queries = guide_passages = None
        if self.cross_device and size > 1:
            all_queries, all_passages, offset = gather_with_grad(queries), gather_with_grad(passages), rank * local
            if guide is not None:
                guide_queries, guide_passages = (gather_with_grad(t.to(queries.device)) for t in guide)
        else:
            all_queries, all_passages, offset = queries, passages, 0
            if guide is not None:
                guide_queries, guide_passages = (t.to(queries.device) for t in guide)
        rows = torch.arange(local, device=queries.device) + offset
        labels = rows * group_size
        own_group = None
        if not in_batch_negatives:
            # Only the query's own group competes (classification-style data).
            group_of_column = torch.arange(all_passages.shape[0], device=queries.device) // group_size
            own_group = group_of_column.unsqueeze(0) == rows.unsqueeze(1)
        scores, masked = self._logits(queries.float() @ all_passages.float().T, labels, own_group,
                                      None if guide is None else guide[0].to(queries.device) @ guide_passages.T)
        loss = F.cross_entropy(scores, labels)
        accuracy = (scores.argmax(dim=1) == labels).float().mean()
        if self.symmetric:
            # Positive passage -> its query, against all queries in the (gathered) batch.
            positives = passages[::group_size]
            own_query = None
            if not in_batch_negatives:
                own_query = torch.zeros(local, all_queries.shape[0], dtype=torch.bool, device=queries.device)
                own_query[torch.arange(local), rows] = True
            reverse_guide = None if guide is None else guide[1].to(queries.device)[::group_size] @ guide_queries.T
            reverse, masked_reverse = self._logits(positives.float() @ all_queries.float().T, rows, own_query,
                                                   reverse_guide)
            masked += masked_reverse
            loss = (loss + F.cross_entropy(reverse, rows)) / 2
        return LossOutput(loss, accuracy.detach(), masked)

    def _balanced(self, queries: torch.Tensor, passages: torch.Tensor, group_size: int, in_batch_negatives: bool,
                  size: int, guide: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
        """Conan's cross-rank balancing: every rank holds the same queries and positives and its
        own hard negatives. Each query competes with the batch's positives (once) and every
        rank's negatives, gathered with gradients: the loss of one process whose groups hold
        all ranks' negatives, computed alike on every rank."""
        local, negatives_per_rank = queries.shape[0], group_size - 1
        columns = _balanced_columns(passages, local, group_size, size)
        labels = torch.arange(local, device=queries.device)
        own = None
        if not in_batch_negatives:
            owner = torch.cat([labels, labels.repeat_interleave(size * negatives_per_rank)])
            own = owner.unsqueeze(0) == labels.unsqueeze(1)
        guide_scores = None
        if guide is not None:
            guide_queries, guide_passages = (t.to(queries.device) for t in guide)
            guide_scores = guide_queries @ _balanced_columns(guide_passages, local, group_size, size).T
        scores, masked = self._logits(queries.float() @ columns.float().T, labels, own, guide_scores)
        loss = F.cross_entropy(scores, labels)
        accuracy = (scores.argmax(dim=1) == labels).float().mean()
        if self.symmetric:  # the queries are the same on every rank: nothing to gather
            own_query = None if in_batch_negatives else torch.eye(local, dtype=torch.bool, device=queries.device)
            reverse_guide = None if guide is None else guide_passages[::group_size] @ guide_queries.T
            reverse, masked_reverse = self._logits(passages[::group_size].float() @ queries.float().T, labels,
                                                   own_query, reverse_guide)
            masked += masked_reverse
            loss = (loss + F.cross_entropy(reverse, labels)) / 2
        return LossOutput(loss, accuracy.detach(), masked)


def _balanced_columns(passages: torch.Tensor, local: int, group_size: int, size: int) -> torch.Tensor:
    """The candidates of a balanced batch: the local positives, then every rank's negatives
    (gathered with gradients), query by query: column ``local + j`` belongs to query
    ``j // (size * (group_size - 1))``."""
    grouped = passages.view(local, group_size, -1)
    if group_size == 1:
        return grouped[:, 0]
    gathered = gather_with_grad(grouped[:, 1:].contiguous())  # (size * local, g - 1, d)
    everyone = gathered.view(size, local, group_size - 1, -1).transpose(0, 1)
    return torch.cat([grouped[:, 0], everyone.reshape(local * size * (group_size - 1), -1)])


class InfoNCE(DatasetLoss):
    """The default loss of (query, positive[, negatives]) records: InfoNCE over the group's
    hard negatives and the batch's other passages, with the teachers a dataset or the run adds
    (distillation of the records' teacher scores, the embedding teacher's similarity structure
    and GISTEmbed's guided masking). Its settings are the top level of ``loss:``."""

    name = "infonce"
    hard_negatives = True
    teacher_scores = True
    embedding_teacher = True

    @classmethod
    def fits_automatically(cls, facts: RecordFacts) -> bool:
        return True  # any pair records: the fallback after the more specific losses

    def __init__(self, dataset: LoadedDataset, config: LossSettings, settings: Any, parts: LossParts) -> None:
        super().__init__(dataset, config, settings, parts)
        self.infonce = InfoNCELoss(config.temperature, config.symmetric, config.cross_device_negatives,
                                   config.false_negative_margin)
        self.guided = config.guided_masking
        self.distill = (KLDistillLoss(config.temperature, config.teacher_temperature)
                        if dataset.teacher is not None and config.distill_weight > 0 else None)
        self.distill_weight = config.distill_weight
        self.structure = (SimilarityStructureLoss(config.structure_kind, config.temperature, config.teacher_temperature)
                          if config.structure_weight > 0 else None)
        self.structure_weight = config.structure_weight

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                 teacher: TeacherSignals | None = None) -> LossOutput:
        ds = self.dataset
        guide = None
        if self.guided:
            if teacher is None or teacher.query is None or teacher.passage is None:
                raise ValueError(f"dataset {ds.name}: guided masking needs the teacher's vectors of the batch")
            guide = (teacher.query, teacher.passage)
        out = self.infonce(queries, passages, ds.group_size, ds.in_batch_negatives, ds.shared_queries, guide)
        loss = out.loss
        if self.distill is not None:
            if teacher is None or teacher.scores is None:
                raise ValueError(f"dataset {ds.name}: a distillation batch came without teacher scores")
            loss = loss + self.distill_weight * self.distill(queries, passages, teacher.scores)
        if self.structure is not None:
            if teacher is None or teacher.similarity is None:
                raise ValueError(f"dataset {ds.name}: a batch came without the teacher's similarities")
            loss = loss + self.structure_weight * self.structure(queries, passages, teacher.similarity)
        return LossOutput(loss, out.accuracy, out.masked)

"""CoSENT: a ranking loss on cosine similarities for pairs that carry a graded score.

Su, 2022, "CoSENT: A more efficient sentence vector scheme than Sentence-BERT"
(https://kexue.fm/archives/8847); also used by Li & Li, 2023 (AnglE, arXiv 2309.12871).
For every two pairs where ``score_i > score_j`` it asks ``cos_i > cos_j``:
``loss = log(1 + sum exp(scale * (cos_j - cos_i)))``. Only the order of scores matters, so
0-1, 0-5 or any monotone scale works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmembed.config import bounded, check_ranges
from llmembed.data.collate import LoadedDataset
from llmembed.data.schema import RecordFacts
from llmembed.distributed import gather_with_grad, world
from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings, TeacherSignals


class CoSENTLoss:
    def __init__(self, scale: float = 20.0, cross_device: bool = True) -> None:
        self.scale = scale
        self.cross_device = cross_device

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor) -> LossOutput:
        _, size = world()
        if self.cross_device and size > 1:
            queries, passages = gather_with_grad(queries), gather_with_grad(passages)
            scores = gather_with_grad(scores.to(queries.device))
        cos = F.cosine_similarity(queries.float(), passages.float(), dim=-1) * self.scale
        diff = cos.unsqueeze(0) - cos.unsqueeze(1)  # [i, j] = cos_j - cos_i
        wanted = scores.unsqueeze(1) > scores.unsqueeze(0)  # score_i > score_j
        diff = diff.masked_fill(~wanted, float("-inf"))
        zero = torch.zeros(1, device=diff.device, dtype=diff.dtype)
        loss = torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)
        # Pairwise ranking accuracy as the metric.
        agree = ((cos.unsqueeze(1) > cos.unsqueeze(0)) & wanted).sum()
        accuracy = agree.float() / wanted.sum().clamp(min=1)
        return LossOutput(loss, accuracy.detach())


@dataclass
class CoSENTSettings:
    """``loss.cosent``."""

    # The cosines' scale inside the exponent (Su's and AnglE's 20).
    scale: float = bounded(20.0, gt=0.0)

    def __post_init__(self) -> None:
        check_ranges(self)


class CoSENT(DatasetLoss):
    """CoSENT for records that each carry a graded score: one passage per query, no hard
    negatives. ``loss: auto`` picks it when every record of a dataset is scored (a partly
    scored set cannot be ranked as a whole)."""

    name = "cosent"
    needs_scores = True
    settings_class = CoSENTSettings

    @classmethod
    def fits_automatically(cls, facts: RecordFacts) -> bool:
        return facts.all_scored

    def __init__(self, dataset: LoadedDataset, config: LossSettings, settings: CoSENTSettings,
                 parts: LossParts) -> None:
        super().__init__(dataset, config, settings, parts)
        self.cosent = CoSENTLoss(settings.scale, config.cross_device_negatives)

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                 teacher: TeacherSignals | None = None) -> LossOutput:
        if scores is None:
            raise ValueError(f"dataset {self.dataset.name}: a CoSENT batch came without scores")
        return self.cosent(queries, passages, scores)

"""Similarity-structure distillation from an embedding teacher.

The student's matrix of cosines between the batch's queries and passages is matched to the
teacher's on the same texts by mean squared error. Only similarities are compared, never the
vectors, so teacher and student may have any widths: the "similarity loss" of Jasper and
Stella (Zhang et al., 2024, arXiv 2412.19048), which distil several large embedders into a
small one. The teacher (any sentence-transformers folder, e.g. the packaged
all-MiniLM-L6-v2) runs frozen on the raw texts of each batch, without instructions.

The matrices are each rank's own (local queries x local passages), unlike InfoNCE's gathered
negatives, so the loss depends on how a global batch is split over processes. Gathering the
passages of every rank was tried on the CPU recipe's dev split and scored lower in both
languages at two seeds (bench/results/cpu_recipe.md).

``kind="kl"`` matches each query's distribution over all the batch's passages instead
(listwise, RocketQAv2-style distillation over in-batch candidates, arXiv 2110.07367): only
the teacher's ranking and relative margins count, not its absolute cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


KINDS = ("mse", "kl")


class SimilarityStructureLoss:
    def __init__(self, kind: str = "mse", temperature: float = 0.02, teacher_temperature: float = 0.02) -> None:
        if kind not in KINDS:
            raise ValueError(f"loss.structure_kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``queries`` (B, d) and ``passages`` (P, d) of the student; ``teacher`` (B, P) cosines."""
        if teacher.shape != (queries.shape[0], passages.shape[0]):
            raise ValueError(f"teacher similarities {tuple(teacher.shape)} do not match {queries.shape[0]} queries "
                             f"x {passages.shape[0]} passages")
        student = F.normalize(queries.float(), dim=-1) @ F.normalize(passages.float(), dim=-1).T
        teacher = teacher.float().to(student.device)
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return F.kl_div(F.log_softmax(student / self.temperature, dim=1),
                        F.log_softmax(teacher / self.teacher_temperature, dim=1), reduction="batchmean", log_target=True)

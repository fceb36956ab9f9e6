"""Similarity-structure distillation from an embedding teacher.

The student's matrix of cosines between the batch's queries and passages is matched to the
teacher's on the same texts by mean squared error. Only similarities are compared, never the
vectors, so teacher and student may have any widths: the "similarity loss" of Jasper and
Stella (Zhang et al., 2024, arXiv 2412.19048), which distil several large embedders into a
small one. The teacher (any sentence-transformers folder, e.g. the packaged
all-MiniLM-L6-v2) runs frozen on the raw texts of each batch, without instructions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SimilarityStructureLoss:
    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``queries`` (B, d) and ``passages`` (P, d) of the student; ``teacher`` (B, P) cosines."""
        if teacher.shape != (queries.shape[0], passages.shape[0]):
            raise ValueError(f"teacher similarities {tuple(teacher.shape)} do not match {queries.shape[0]} queries "
                             f"x {passages.shape[0]} passages")
        student = F.normalize(queries.float(), dim=-1) @ F.normalize(passages.float(), dim=-1).T
        return F.mse_loss(student, teacher.float().to(student.device))

"""KL distillation of a teacher's scores over each query's own candidates.

The student's distribution over a query's group (its positive and hard negatives) is pulled
towards the teacher's: ``KL(softmax(t / T_teacher) || softmax(q . p / T_student))``, averaged
over queries. This is the listwise distillation of RocketQAv2 (Ren et al., 2021, arXiv
2110.07367) and FlagEmbedding's bge training with reranker scores (Xiao et al., 2023, C-Pack,
arXiv 2309.07597): the teacher says not only which passage is relevant but how much more than
the others, which hard labels cannot. Teacher scores come from the records (``llmembed.mine``
writes the mining model's and, with ``--cross-encoder``, the reranker's into ``meta.mining``),
so the teacher runs once, offline. Rows whose teacher scores are NaN (a record mining left
without negatives) sit out. A teacher equal to the student gives zero loss and zero gradient
(tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KLDistillLoss:
    def __init__(self, temperature: float = 0.02, teacher_temperature: float = 0.02) -> None:
        if temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(f"distillation temperatures must be > 0, got {temperature}, {teacher_temperature}")
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``queries`` (B, d), ``passages`` (B * g, d) grouped per query, ``teacher`` (B, g)."""
        local, group = teacher.shape
        if queries.shape[0] != local or passages.shape[0] != local * group:
            raise ValueError(f"teacher scores {tuple(teacher.shape)} do not match {queries.shape[0]} queries and "
                             f"{passages.shape[0]} passages")
        student = torch.einsum("bd,bgd->bg", queries.float(), passages.float().view(local, group, -1))
        teacher = teacher.float().to(student.device)
        scored = ~teacher.isnan().any(dim=1)
        if not scored.any():
            return student.sum() * 0.0  # nothing to distil in this batch; keeps the graph whole
        log_student = F.log_softmax(student[scored] / self.temperature, dim=1)
        log_teacher = F.log_softmax(teacher[scored] / self.teacher_temperature, dim=1)
        return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)

"""What every dataset loss is: a class that says what it needs and scores one dataset's batches.

A loss class declares, as class attributes, what the rest of training must give it — the
records it trains on (query/positive pairs or plain texts, graded scores), the batch shape
the collator builds (:class:`~llmembed.data.collate.BatchShape`), whether its groups carry
hard negatives (and so can be re-mined), whether it distils a teacher — and checks the model it
trains before DeepSpeed starts. Loading, collating, the step and re-mining read those
attributes; none of them switches on a loss's name. An instance is the loss bound to one
loaded dataset (its group size, in-batch negatives, teacher), built once by
:class:`~llmembed.losses.router.LossRouter`.

A new loss is one file with its class (and its settings dataclass, if it has any), plus its
entry in :mod:`llmembed.losses.router`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llmembed.config import bounded, check_ranges
from llmembed.data.collate import BatchShape, LoadedDataset
from llmembed.data.masking import TokenMasking
from llmembed.data.schema import RecordFacts
from llmembed.model import EmbeddingModel


@dataclass
class LossOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor  # share of queries whose positive scores highest
    masked: int = 0  # negatives left out as likely false negatives (this rank's rows)


@dataclass
class TeacherSignals:
    """What a teacher says about one micro-batch: ``scores`` (B, group) of each query's own
    candidates, from the records; ``query`` (B, dt) and ``passage`` (B * group, dt), an
    embedding teacher's normalised vectors of the batch's texts. ``similarity`` may be given
    directly; otherwise it is ``query @ passage.T``."""

    scores: torch.Tensor | None = None
    similarity: torch.Tensor | None = None
    query: torch.Tensor | None = None
    passage: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.similarity is None and self.query is not None and self.passage is not None:
            self.similarity = self.query @ self.passage.T


@dataclass
class LossSettings:
    """The top level of a config's ``loss:`` section: the default loss's (InfoNCE) settings with
    its teachers, and what applies to every pair loss of the run (cross-device gathering,
    GradCache, Matryoshka widths). Losses with settings of their own read them from a section
    named after them (``loss.cosent.scale``)."""

    temperature: float = bounded(0.02, gt=0.0)
    symmetric: bool = False
    cross_device_negatives: bool = True
    # InfoNCE: negatives scoring above the positive by more than this (cosine) leave the
    # denominator as likely false negatives; null: none are masked. 0.1 is a usual setting.
    false_negative_margin: float | None = bounded(None, ge=0.0)
    # Datasets with teacher_scores add distill_weight x KL(teacher || student) over each query's
    # own candidates; the teacher's scores are turned into a distribution at teacher_temperature.
    distill_weight: float = bounded(1.0, ge=0.0)
    teacher_temperature: float = bounded(0.02, gt=0.0)
    # An embedding teacher (a sentence-transformers folder) run on every batch's texts: InfoNCE
    # datasets add structure_weight x MSE(student cosines, teacher cosines), queries x passages.
    teacher_model: str | None = None
    structure_weight: float = bounded(0.0, ge=0.0)
    # "mse": the cosines themselves (Jasper); "kl": each query's distribution over the batch's
    # passages at temperature / teacher_temperature (listwise over in-batch candidates).
    structure_kind: str = "mse"
    # GISTEmbed's guide: InfoNCE candidates that teacher_model scores above the query's
    # positive leave the denominator (counted in masked_negatives).
    guided_masking: bool = False
    # GradCache (llmembed.train.grad_cache): encode and back-propagate each micro-batch this
    # many queries (with their passages) at a time, so activation memory stays that of a chunk
    # while the loss and its gradient are those of the whole cross-device batch. null: off.
    grad_cache_chunk: int | None = bounded(None, ge=1)
    # Matryoshka: every pair loss is also taken on these prefix widths of the embeddings
    # (re-normalised) and summed with matryoshka_weights (default 1 each); include the full
    # width to train it too. The trained widths are saved in the model's serving contract.
    # Equal weights cost the full width; weighting it as much as all the prefixes together
    # kept it (measured in bench/results/matryoshka.md).
    matryoshka_dims: list[int] | None = bounded(None, ge=1)
    matryoshka_weights: list[float] | None = bounded(None, ge=0.0)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.structure_kind not in ("mse", "kl"):
            raise ValueError(f"structure_kind must be mse or kl, got {self.structure_kind!r}")
        if self.structure_weight > 0 and not self.teacher_model:
            raise ValueError("structure_weight > 0 needs teacher_model (a sentence-transformers folder)")
        if self.guided_masking and not self.teacher_model:
            raise ValueError("guided_masking needs teacher_model (a sentence-transformers folder) as the guide")
        dims = self.matryoshka_dims
        if dims is not None and (not dims or min(dims) < 1 or len(set(dims)) != len(dims)):
            raise ValueError(f"matryoshka_dims must be distinct widths >= 1, got {dims}")
        if self.matryoshka_weights is not None:
            if dims is None or len(self.matryoshka_weights) != len(dims):
                raise ValueError("matryoshka_weights needs matryoshka_dims, one weight per width")
            if min(self.matryoshka_weights) < 0 or sum(self.matryoshka_weights) <= 0:
                raise ValueError(f"matryoshka_weights must be >= 0 with a positive sum, got {self.matryoshka_weights}")


@dataclass
class LossParts:
    """What a loss takes from the model it trains, made once before training: a module it
    scores with (MNTP's output-embedding head) and how the collator masks its texts."""

    head: nn.Module | None = None
    masking: TokenMasking | None = None


class DatasetLoss:
    """Base of every dataset loss. Subclasses set the class attributes below and ``__call__``.

    Pair losses (``batch_shape`` PAIRS or VIEWS) are called with the batch's query and passage
    embeddings, the records' scores and the teacher's signals; token losses (TOKENS) with the
    texts' token states and labels."""

    name: ClassVar[str]
    batch_shape: ClassVar[BatchShape] = BatchShape.PAIRS
    # Trains on plain {"text"} records (no query or positive).
    text_only: ClassVar[bool] = False
    # Needs a graded score on every record.
    needs_scores: ClassVar[bool] = False
    # Each query's group holds a positive and data.group_size - 1 hard negatives (so re-mining
    # applies); otherwise one passage per query.
    hard_negatives: ClassVar[bool] = False
    # May distil a teacher's scores of each group (a dataset's teacher_scores).
    teacher_scores: ClassVar[bool] = False
    # Reads an embedding teacher's vectors of the batch's texts (loss.teacher_model).
    embedding_teacher: ClassVar[bool] = False
    # Its settings dataclass, read from loss.<name>; None: it has none of its own.
    settings_class: ClassVar[type | None] = None

    @classmethod
    def problem_with(cls, facts: RecordFacts) -> str | None:
        """Why this loss cannot train a dataset with these facts, or None."""
        if cls.text_only and facts.plain_text < facts.count:
            return f"loss {cls.name} trains on unlabelled text: every record must be {{\"text\": ...}}"
        if cls.needs_scores and facts.scored < facts.count:
            return f"loss {cls.name} needs a score on every record"
        return None

    @classmethod
    def fits_automatically(cls, facts: RecordFacts) -> bool:
        """Whether ``loss: auto`` picks this loss for a dataset with these facts (asked in registry order)."""
        return False

    @classmethod
    def prepare(cls, model: EmbeddingModel, settings: Any, zero_stage: int, dataset: str) -> LossParts:
        """Refuse a model this loss cannot train (before DeepSpeed starts) and make what it
        needs from it. ``settings``: the loss's own settings (None without a settings class)."""
        return LossParts()

    def __init__(self, dataset: LoadedDataset, config: LossSettings, settings: Any, parts: LossParts) -> None:
        self.dataset = dataset

    def __call__(self, *args: Any, **kwargs: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

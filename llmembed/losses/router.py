"""Which loss trains which dataset, decided once.

A dataset's loss is a property of its records, not of a batch: CoSENT needs a graded score on
every record, InfoNCE needs positives (and optionally hard negatives). :func:`choose_loss`
makes that choice when a dataset is loaded; :class:`LossRouter` binds each dataset's loss to
its settings (group size, in-batch negatives) once, and the training step only asks it for
``router(batch["dataset"])``. No loss name travels through batches, and adding a loss means
one file here plus one branch in :meth:`LossRouter._bind`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmembed.config import bounded, check_ranges

from llmembed.losses.cosent import CoSENTLoss
from llmembed.losses.distill import KLDistillLoss
from llmembed.losses.structure import SimilarityStructureLoss
from llmembed.losses.infonce import InfoNCELoss, LossOutput
from llmembed.losses.matryoshka import MatryoshkaLoss

if TYPE_CHECKING:  # pragma: no cover
    from llmembed.data.collate import LoadedDataset

LOSS_NAMES = ("infonce", "cosent", "simcse", "mntp")
# Losses of unlabelled {"text"} records.
TEXT_LOSSES = ("simcse", "mntp")


@dataclass
class LossConfig:
    """The ``loss:`` section of a training config: settings shared by every dataset."""

    temperature: float = bounded(0.02, gt=0.0)
    symmetric: bool = False
    cross_device_negatives: bool = True
    cosent_scale: float = bounded(20.0, gt=0.0)
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
    # SimCSE datasets (unlabelled text, two dropout views): Gao et al. use 0.05.
    simcse_temperature: float = bounded(0.05, gt=0.0)
    # MNTP datasets (LLM2Vec): share of eligible tokens masked, and the mask token for
    # tokenizers without one (LLM2Vec uses "_" for Llama and Mistral).
    mntp_probability: float = bounded(0.2, gt=0.0, lt=1.0)
    mntp_mask_token: str = "_"
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


def choose_loss(requested: str, scored: Sequence[bool], where: str, plain_text: Sequence[bool] = ()) -> str:
    """The loss for a dataset whose records carry a score where ``scored`` is true and are
    plain ``{"text"}`` records where ``plain_text`` is.

    ``auto`` picks CoSENT only when every record is scored: a partly scored set cannot be
    ranked as a whole, and InfoNCE ignores scores; SimCSE when every record is plain text.
    ``where`` names the dataset in errors.
    """
    if requested == "auto":
        if plain_text and all(plain_text):
            return "simcse"
        return "cosent" if scored and all(scored) else "infonce"
    if requested not in LOSS_NAMES:
        raise ValueError(f"{where}: unknown loss {requested!r}; choose auto or one of {LOSS_NAMES}")
    if requested == "cosent" and not all(scored):
        raise ValueError(f"{where}: loss cosent needs a score on every record")
    if requested in TEXT_LOSSES and not (plain_text and all(plain_text)):
        raise ValueError(f"{where}: loss {requested} trains on unlabelled text: every record must be {{\"text\": ...}}")
    return requested


class DatasetLoss(Protocol):
    """A loss bound to one dataset: embeddings in, loss and accuracy out."""

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor,
                 scores: torch.Tensor | None = None, teacher: TeacherSignals | None = None) -> LossOutput: ...


class TokenLoss(Protocol):
    """A token-level loss bound to one dataset (MNTP): the texts' token states and per-token
    labels in, loss and accuracy out."""

    def __call__(self, states: torch.Tensor, labels: torch.Tensor) -> LossOutput: ...


class LossRouter:
    """One bound loss per loaded dataset, indexed like the dataset list the sampler draws from.
    ``mntp_head`` (:class:`~llmembed.losses.mntp.MNTPHead`) scores MNTP datasets."""

    def __init__(self, datasets: Sequence[LoadedDataset], config: LossConfig,
                 mntp_head: torch.nn.Module | None = None, normalized: bool = True) -> None:
        """``normalized``: the model's embeddings are unit vectors (Matryoshka prefixes are then
        re-normalised too)."""
        self.infonce = InfoNCELoss(config.temperature, config.symmetric, config.cross_device_negatives,
                                   config.false_negative_margin)
        self.cosent = CoSENTLoss(config.cosent_scale, config.cross_device_negatives)
        # SimCSE is InfoNCE between two dropout views (no margin masking: a view is never a
        # false negative of another text's view more than of its own).
        self.simcse = InfoNCELoss(config.simcse_temperature, config.symmetric, config.cross_device_negatives)
        self.distill = KLDistillLoss(config.temperature, config.teacher_temperature)
        self.distill_weight = config.distill_weight
        self.structure = (SimilarityStructureLoss(config.structure_kind, config.temperature, config.teacher_temperature)
                          if config.structure_weight > 0 else None)
        self.structure_weight = config.structure_weight
        self.guided_masking = config.guided_masking
        self.mntp_head = mntp_head
        self.matryoshka = (MatryoshkaLoss(config.matryoshka_dims, config.matryoshka_weights, normalized)
                           if config.matryoshka_dims else None)
        self.names = [ds.loss for ds in datasets]
        self._losses = [self._with_matryoshka(ds, self._bind(ds)) for ds in datasets]

    def _with_matryoshka(self, ds: LoadedDataset, bound: DatasetLoss | TokenLoss) -> DatasetLoss | TokenLoss:
        matryoshka = self.matryoshka
        if matryoshka is None or ds.loss in ("mntp",):
            return bound

        def run_matryoshka(queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                           teacher: TeacherSignals | None = None) -> LossOutput:
            return matryoshka(bound, queries, passages, scores, teacher)

        return run_matryoshka

    def _bind(self, ds: LoadedDataset) -> DatasetLoss | TokenLoss:
        if ds.loss == "infonce":
            infonce, group, in_batch, shared = self.infonce, ds.group_size, ds.in_batch_negatives, ds.shared_queries
            guided = self.guided_masking
            distill = self.distill if ds.teacher is not None and self.distill_weight > 0 else None
            structure, weight, structure_weight, name = self.structure, self.distill_weight, self.structure_weight, ds.name

            def run_infonce(queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                            teacher: TeacherSignals | None = None) -> LossOutput:
                guide = None
                if guided:
                    if teacher is None or teacher.query is None or teacher.passage is None:
                        raise ValueError(f"dataset {name}: guided masking needs the teacher's vectors of the batch")
                    guide = (teacher.query, teacher.passage)
                out = infonce(queries, passages, group, in_batch, shared, guide)
                loss = out.loss
                if distill is not None:
                    if teacher is None or teacher.scores is None:
                        raise ValueError(f"dataset {name}: a distillation batch came without teacher scores")
                    loss = loss + weight * distill(queries, passages, teacher.scores)
                if structure is not None:
                    if teacher is None or teacher.similarity is None:
                        raise ValueError(f"dataset {name}: a batch came without the teacher's similarities")
                    loss = loss + structure_weight * structure(queries, passages, teacher.similarity)
                return LossOutput(loss, out.accuracy, out.masked)

            return run_infonce
        if ds.loss == "mntp":
            head = self.mntp_head
            if head is None:
                raise ValueError(f"dataset {ds.name} trains MNTP: the loss router needs the model's MNTP head")

            def run_mntp(states: torch.Tensor, labels: torch.Tensor) -> LossOutput:
                return LossOutput(*head(states, labels))

            return run_mntp
        if ds.loss == "simcse":
            simcse = self.simcse

            def run_simcse(queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                           teacher: TeacherSignals | None = None) -> LossOutput:
                return simcse(queries, passages, 1, True)

            return run_simcse
        if ds.loss == "cosent":
            cosent, name = self.cosent, ds.name

            def run_cosent(queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                           teacher: TeacherSignals | None = None) -> LossOutput:
                if scores is None:
                    raise ValueError(f"dataset {name}: a CoSENT batch came without scores")
                return cosent(queries, passages, scores)

            return run_cosent
        raise ValueError(f"dataset {ds.name}: unknown loss {ds.loss!r}; choose one of {LOSS_NAMES}")

    def __call__(self, dataset: int) -> DatasetLoss | TokenLoss:
        return self._losses[dataset]

    def __len__(self) -> int:
        return len(self._losses)

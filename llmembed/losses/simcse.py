"""Unsupervised SimCSE: a text against itself under another dropout mask.

Gao et al., 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings" (arXiv
2104.08821). Each plain ``{"text"}`` record is encoded twice as a passage; the two views differ
only by dropout, and InfoNCE with in-batch negatives pulls them together. The model must have
dropout (LoRA's or the backbone's attention dropout), or the views are equal and nothing is
learnt: :meth:`SimCSE.prepare` refuses such a model before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmembed.config import bounded, check_ranges
from llmembed.data.collate import BatchShape, LoadedDataset
from llmembed.data.schema import RecordFacts
from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings, TeacherSignals
from llmembed.losses.infonce import InfoNCELoss
from llmembed.model import EmbeddingModel


@dataclass
class SimCSESettings:
    """``loss.simcse``."""

    # Gao et al. use 0.05.
    temperature: float = bounded(0.05, gt=0.0)

    def __post_init__(self) -> None:
        check_ranges(self)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training-mode forwards are random: a dropout layer (LoRA's among them) or
    attention dropout in the backbone's config."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    return any(float(getattr(getattr(m, "config", None), "attention_dropout", 0) or 0) > 0 for m in model.modules())


class SimCSE(DatasetLoss):
    """InfoNCE between two dropout views of each text, at its own temperature (no margin
    masking: a view is never a false negative of another text's view more than of its own).
    ``loss: auto`` picks it when every record is plain text."""

    name = "simcse"
    batch_shape = BatchShape.VIEWS
    text_only = True
    settings_class = SimCSESettings

    @classmethod
    def fits_automatically(cls, facts: RecordFacts) -> bool:
        return facts.all_plain_text

    @classmethod
    def prepare(cls, model: EmbeddingModel, settings: SimCSESettings, zero_stage: int, dataset: str) -> LossParts:
        if not has_dropout(model):
            raise ValueError(f"dataset {dataset} trains SimCSE, whose two views differ only by dropout, and the model "
                             "has none: set model.lora.dropout (e.g. 0.1) or model.backbone.attention_dropout")
        return LossParts()

    def __init__(self, dataset: LoadedDataset, config: LossSettings, settings: SimCSESettings,
                 parts: LossParts) -> None:
        super().__init__(dataset, config, settings, parts)
        self.simcse = InfoNCELoss(settings.temperature, config.symmetric, config.cross_device_negatives)

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                 teacher: TeacherSignals | None = None) -> LossOutput:
        return self.simcse(queries, passages, 1, True)

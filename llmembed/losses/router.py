"""The registry of dataset losses, the ``loss:`` config section, and the router that binds one
loss to each loaded dataset.

A dataset's loss is a property of its records, not of a batch: :func:`choose_loss` picks the
class when a dataset is loaded (``loss: auto`` asks each registered class, in order, whether
the records fit it; a named loss is checked against them); :class:`LossRouter` binds it to the
dataset once, and the training step only asks ``router(batch["dataset"])``. Adding a loss is
its file (:mod:`llmembed.losses.base` says what it declares) plus its entry in ``LOSSES`` and,
if it has settings, its section in :class:`LossConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmembed.data.collate import BatchShape, LoadedDataset
from llmembed.data.schema import RecordFacts
from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings, TeacherSignals
from llmembed.losses.cosent import CoSENT, CoSENTSettings
from llmembed.losses.infonce import InfoNCE
from llmembed.losses.matryoshka import MatryoshkaLoss
from llmembed.losses.mntp import MNTP, MNTPSettings
from llmembed.losses.simcse import SimCSE, SimCSESettings

# Every dataset loss, in the order ``loss: auto`` asks them (the most specific first).
LOSSES: tuple[type[DatasetLoss], ...] = (SimCSE, CoSENT, InfoNCE, MNTP)
LOSS_NAMES = tuple(loss.name for loss in LOSSES)


@dataclass
class LossConfig(LossSettings):
    """The ``loss:`` section of a training config: the shared settings
    (:class:`~llmembed.losses.base.LossSettings`) and one section per loss that has its own."""

    cosent: CoSENTSettings = field(default_factory=CoSENTSettings)
    simcse: SimCSESettings = field(default_factory=SimCSESettings)
    mntp: MNTPSettings = field(default_factory=MNTPSettings)

    def settings_of(self, loss: type[DatasetLoss]) -> object | None:
        """A loss's own settings (None for a loss without a settings class)."""
        return getattr(self, loss.name) if loss.settings_class is not None else None


# Registration is checked when the module loads: a loss with settings has its section, of its
# settings class, in LossConfig (else a config could never set them and settings_of would fail).
for _loss in LOSSES:
    _section = LossConfig.__dataclass_fields__.get(_loss.name)
    if _loss.settings_class is not None and (_section is None or _section.type not in
                                             (_loss.settings_class, _loss.settings_class.__name__)):
        raise TypeError(f"{_loss.__name__} has settings ({_loss.settings_class.__name__}): give LossConfig a "
                        f"field {_loss.name}: {_loss.settings_class.__name__}")


def loss_class(name: str, where: str = "loss") -> type[DatasetLoss]:
    """The registered loss called ``name``."""
    for loss in LOSSES:
        if loss.name == name:
            return loss
    raise ValueError(f"{where}: unknown loss {name!r}; choose auto or one of {LOSS_NAMES}")


def choose_loss(requested: str, facts: RecordFacts, where: str) -> type[DatasetLoss]:
    """The loss class for a dataset with these record facts: the first registered class that
    fits them when ``requested`` is ``auto``, else the named one if the records suit it.
    ``where`` names the dataset in errors."""
    if requested == "auto":
        return next(loss for loss in LOSSES if loss.fits_automatically(facts))
    loss = loss_class(requested, where)
    problem = loss.problem_with(facts)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return loss


class _Matryoshka:
    """A pair loss also taken on the run's Matryoshka prefix widths."""

    def __init__(self, loss: DatasetLoss, matryoshka: MatryoshkaLoss) -> None:
        self.loss, self.matryoshka = loss, matryoshka
        self.batch_shape = loss.batch_shape

    def __call__(self, queries: torch.Tensor, passages: torch.Tensor, scores: torch.Tensor | None = None,
                 teacher: TeacherSignals | None = None) -> LossOutput:
        return self.matryoshka(self.loss, queries, passages, scores, teacher)


class LossRouter:
    """One bound loss per loaded dataset, indexed like the dataset list the sampler draws from.
    ``parts``: per dataset, what its loss took from the model (:meth:`DatasetLoss.prepare`)."""

    def __init__(self, datasets: Sequence[LoadedDataset], config: LossConfig,
                 parts: Sequence[LossParts] | None = None, normalized: bool = True) -> None:
        """``normalized``: the model's embeddings are unit vectors (Matryoshka prefixes are then
        re-normalised too)."""
        parts = list(parts) if parts is not None else [LossParts() for _ in datasets]
        matryoshka = (MatryoshkaLoss(config.matryoshka_dims, config.matryoshka_weights, normalized)
                      if config.matryoshka_dims else None)
        self.names = [ds.loss.name for ds in datasets]
        self._losses = []
        for ds, part in zip(datasets, parts, strict=True):
            loss_type = ds.loss
            if not (isinstance(loss_type, type) and issubclass(loss_type, DatasetLoss)):
                raise TypeError(f"dataset {ds.name}: its loss must be a DatasetLoss class, got {loss_type!r}")
            bound = loss_type(ds, config, config.settings_of(loss_type), part)
            pairs = loss_type.batch_shape is not BatchShape.TOKENS
            self._losses.append(_Matryoshka(bound, matryoshka) if matryoshka is not None and pairs else bound)

    def __call__(self, dataset: int) -> DatasetLoss | _Matryoshka:
        return self._losses[dataset]

    def __len__(self) -> int:
        return len(self._losses)

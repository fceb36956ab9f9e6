"""Dataset losses, one per file, each a class that declares what it needs
(:mod:`llmembed.losses.base`); the registry and router that bind one to each dataset."""

from llmembed.losses.base import DatasetLoss, LossOutput, LossParts, LossSettings, TeacherSignals
from llmembed.losses.cosent import CoSENT, CoSENTLoss
from llmembed.losses.distill import KLDistillLoss
from llmembed.losses.infonce import InfoNCE, InfoNCELoss
from llmembed.losses.mntp import MNTP
from llmembed.losses.router import LOSS_NAMES, LOSSES, LossConfig, LossRouter, choose_loss, loss_class
from llmembed.losses.simcse import SimCSE
from llmembed.losses.structure import SimilarityStructureLoss

__all__ = ["LOSSES", "LOSS_NAMES", "CoSENT", "CoSENTLoss", "DatasetLoss", "InfoNCE", "InfoNCELoss", "KLDistillLoss",
           "LossConfig", "LossOutput", "LossParts", "LossRouter", "LossSettings", "MNTP", "SimCSE",
           "SimilarityStructureLoss", "TeacherSignals", "choose_loss", "loss_class"]

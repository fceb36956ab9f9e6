"""Contrastive and ranking losses, one per file, and the router that picks one per dataset."""

from llmembed.losses.cosent import CoSENTLoss
from llmembed.losses.distill import KLDistillLoss
from llmembed.losses.infonce import InfoNCELoss, LossOutput
from llmembed.losses.router import LOSS_NAMES, DatasetLoss, LossConfig, LossRouter, TeacherSignals, choose_loss
from llmembed.losses.structure import SimilarityStructureLoss

__all__ = ["LOSS_NAMES", "CoSENTLoss", "DatasetLoss", "InfoNCELoss", "KLDistillLoss", "LossConfig", "LossOutput", "LossRouter", "SimilarityStructureLoss", "TeacherSignals",
           "choose_loss"]

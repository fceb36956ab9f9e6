"""Contrastive and ranking losses, one per file."""

from llmembed.losses.cosent import CoSENTLoss
from llmembed.losses.infonce import InfoNCELoss, LossOutput

__all__ = ["CoSENTLoss", "InfoNCELoss", "LossOutput"]

"""Matryoshka representation learning: one loss over several prefixes of the embedding.

Kusupati et al., 2022, "Matryoshka Representation Learning" (arXiv 2205.13147); used for
text embedders by OpenAI's text-embedding-3, Nomic, Jina and Qwen3-Embedding. The dataset's
own loss (InfoNCE, CoSENT, SimCSE, with its distillation terms) is evaluated on the first
``d`` dimensions of every embedding, re-normalised, for each ``d`` of ``dims``, and the
results are summed with ``weights``; a model trained so keeps most of its quality when its
vectors are cut to a prefix, where a plain model's prefixes are much worse. The embeddings are
computed once: only the cheap loss is repeated per width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from llmembed.losses.base import LossOutput


def prefix(embeddings: torch.Tensor, dim: int, normalize: bool = True) -> torch.Tensor:
    """The first ``dim`` dimensions, re-normalised when the full vectors are."""
    cut = embeddings[..., :dim]
    return F.normalize(cut.float(), p=2, dim=-1) if normalize else cut


class MatryoshkaLoss:
    def __init__(self, dims: Sequence[int], weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} Matryoshka weights for {len(dims)} dims")
        self.dims, self.weights, self.normalize = list(dims), weights, normalize

    def __call__(self, loss: Callable[..., LossOutput], queries: torch.Tensor, passages: torch.Tensor,
                 *args, **kwargs) -> LossOutput:
        """``sum_d weight_d * loss(prefix(queries, d), prefix(passages, d), ...)``; accuracy and
        masked counts are the widest prefix's."""
        total, widest = None, None
        for dim, weight in sorted(zip(self.dims, self.weights), key=lambda pair: pair[0]):
            out = loss(prefix(queries, dim, self.normalize), prefix(passages, dim, self.normalize), *args, **kwargs)
            total = weight * out.loss if total is None else total + weight * out.loss
            widest = out
        return LossOutput(total, widest.accuracy, widest.masked)

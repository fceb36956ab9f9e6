"""One optimizer step of contrastive training.

We own this step (and not a stock ``Trainer.training_step``) because the loss needs the
whole global batch: queries and passages are encoded separately, the loss gathers embeddings
across ranks with gradients, and the loss itself depends on the dataset the batch came from
(asked of the :class:`~llmembed.losses.LossRouter`). DeepSpeed does the rest: ``backward``
scales for accumulation, ``step`` applies the optimizer and LR schedule at the accumulation
boundary, clips and keeps bf16 master weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmembed.data.sampling import BatchRef
from llmembed.distributed import all_reduce_mean
from llmembed.data.collate import BatchShape
from llmembed.losses.base import LossOutput, TeacherSignals
from llmembed.losses.router import LossRouter
from llmembed.train.grad_cache import cached_backward, split_chunks
from llmembed.model import EmbeddingModel
from llmembed.packing import packed_size, require_block_mask_support


def length_buckets(lengths: torch.Tensor, max_buckets: int) -> list[torch.Tensor]:
    """Row indices of a padded batch split into at most ``max_buckets`` groups of similar
    length, so that the padded tokens (each group padded to its own longest row) are fewest.

    Rows are sorted by length and cut at the points an exact dynamic programme picks; the
    groups' forwards then compute what the one padded forward would (padding is masked and
    RoPE sees only relative positions), on a fraction of the tokens when a few long texts
    sit among short ones.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    n, k = len(sorted_lengths), max(1, min(max_buckets, len(sorted_lengths)))
    # cost[j][i]: fewest padded tokens for the first i rows in j groups; a group starting at
    # row s (sorted, longest first) costs (its size) * sorted_lengths[s].
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for j in range(1, k + 1):
        for i in range(1, n + 1):
            for s in range(j - 1, i):
                c = cost[j - 1][s] + (i - s) * sorted_lengths[s]
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, s
    best = min(range(1, k + 1), key=lambda j: (cost[j][n], j))
    groups, i = [], n
    for j in range(best, 0, -1):
        s = cut[j][i]
        groups.append(order[s:i])
        i = s
    return groups[::-1]


class PairEncoder(nn.Module):
    """What DeepSpeed wraps: one forward encodes a query batch and a passage batch, so ZeRO-3
    gathers each layer's weights once per micro-batch for both.

    With ``length_buckets > 1`` each side is encoded in up to that many passes over rows of
    similar length (see :func:`length_buckets`); the embeddings come back in batch order. With
    ``pack_tokens`` each side runs padding-free instead (:mod:`llmembed.packing`).
    ``processed_tokens`` counts the tokens the passes really ran, padding and filler included."""

    def __init__(self, model: EmbeddingModel, length_buckets: int = 1, pack_tokens: int | None = None) -> None:
        super().__init__()
        if pack_tokens is not None and model.bidirectional:  # refuse before any step, not mid-run
            require_block_mask_support(model.base_model.config._attn_implementation)
        self.model = model
        self.length_buckets = length_buckets
        self.pack_tokens = pack_tokens
        self.processed_tokens = 0

    def forward(self, query: dict, passage: dict | None = None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """(query embeddings, passage embeddings); without passages, the query texts' token
        states (batch, tokens, hidden) for a token-level loss (MNTP)."""
        self.processed_tokens = 0
        if passage is None:
            self.processed_tokens = query["attention_mask"].numel()
            return self.model.token_states(query["input_ids"], query["attention_mask"])
        return self._encode(query), self._encode(passage)

    def _encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        if self.pack_tokens is not None:
            self.processed_tokens += packed_size(mask, self.pack_tokens)
            return self.model(**batch, pack_tokens=self.pack_tokens)
        if self.length_buckets <= 1:
            self.processed_tokens += mask.numel()
            return self.model(**batch)
        parts, rows = [], []
        for group in length_buckets(mask.sum(dim=1), self.length_buckets):
            columns = mask[group].any(dim=0)  # padding is contiguous: drop the all-pad columns
            sub = {k: (v[group][:, columns] if v.dim() == 2 else v[group]) for k, v in batch.items()}
            self.processed_tokens += sub["attention_mask"].numel()
            parts.append(self.model(**sub))
            rows.append(group)
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]


@dataclass
class StepStats:
    """One optimizer step. ``loss``/``accuracy`` are means over ranks and micro-batches; the
    counts are this rank's (padded tokens are what the model processed)."""

    loss: float
    accuracy: float
    grad_norm: float
    samples: int
    padded_tokens: int
    real_tokens: int
    masked_negatives: int = 0  # likely false negatives the loss left out (this rank)
    # (dataset, row, mean cosine of the query with its own hard negatives) per query of this
    # rank's micro-batches, for re-mining; no rows when the batches had no hard negatives.
    negative_scores: torch.Tensor | None = None


def negative_scores(ref: BatchRef, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """``(dataset, row, mean cosine with its hard negatives)`` for each query of a micro-batch
    (passages grouped per query, positive first); float64, so row numbers stay exact."""
    group = passages.shape[0] // max(queries.shape[0], 1)
    if group < 2:
        return torch.zeros(0, 3, dtype=torch.float64)
    with torch.no_grad():
        q = torch.nn.functional.normalize(queries.float(), dim=-1)
        p = torch.nn.functional.normalize(passages.float(), dim=-1).view(q.shape[0], group, -1)
        mean = (p[:, 1:] @ q.unsqueeze(-1)).squeeze(-1).mean(dim=1).double().cpu()
    rows = torch.tensor(ref.indices, dtype=torch.float64)
    return torch.stack([torch.full_like(rows, ref.dataset), rows, mean], dim=1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def optimizer_step(engine: Any, batches: Iterator[BatchRef], collate: Callable[[BatchRef], dict],
                   losses: LossRouter, accumulation: int, grad_cache_chunk: int | None = None) -> StepStats:
    """Run ``accumulation`` micro-batches through forward, loss and backward; DeepSpeed steps
    the optimizer after the last one. Collective: every rank calls it once per step.

    With ``grad_cache_chunk`` the pair batches are encoded and back-propagated that many
    queries at a time (:mod:`~llmembed.train.grad_cache`): the engine runs with
    ``managed_gradient_accumulation: false``, every chunk's backward accumulates, and the one
    ``engine.step()`` after the last micro-batch reduces and updates.
    """
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    accuracy_sum = torch.zeros((), device=device)
    samples = padded = real = masked = 0
    seen = []
    for _ in range(accumulation):
        ref = next(batches)
        batch = collate(ref)
        query = _to(batch["query"], device)
        loss = losses(batch["dataset"])
        if loss.batch_shape is BatchShape.TOKENS:  # a token-level loss over the texts' token states
            out = loss(engine(query), batch["labels"].to(device))
            engine.backward(out.loss)
            padded += engine.module.processed_tokens
            real += int(query["attention_mask"].sum())
        else:
            passage = _to(batch["passage"], device)
            scores = batch["scores"].to(device) if "scores" in batch else None
            teacher = None
            if "teacher_scores" in batch or "teacher_query" in batch:
                scores_t, query_t, passage_t = (batch[k].to(device) if k in batch else None
                                                for k in ("teacher_scores", "teacher_query", "teacher_passage"))
                teacher = TeacherSignals(scores_t, query=query_t, passage=passage_t)

            def batch_loss(q: torch.Tensor, p: torch.Tensor) -> LossOutput:
                return loss(q, p, scores, teacher)

            if grad_cache_chunk is None:
                q, p = engine(query, passage)
                out = batch_loss(q, p)
                engine.backward(out.loss)
                padded += engine.module.processed_tokens
            else:
                out, q, p, tokens = _cached_step(engine, query, passage, grad_cache_chunk, batch_loss)
                padded += tokens
            seen.append(negative_scores(ref, q, p))
            real += int(query["attention_mask"].sum() + passage["attention_mask"].sum())
        if grad_cache_chunk is None:
            engine.step()
        loss_sum += out.loss.detach() / accumulation
        accuracy_sum += out.accuracy / accumulation
        masked += out.masked
        samples += query["input_ids"].shape[0]
    if grad_cache_chunk is not None:
        engine.step()  # the accumulation boundary: reduce what every backward accumulated, update
    # One all-reduce for both means (a collective every rank reaches at the same step).
    loss, accuracy = all_reduce_mean(torch.stack([loss_sum, accuracy_sum])).tolist()
    grad_norm = engine.get_global_grad_norm()
    return StepStats(loss, accuracy, float(grad_norm) if grad_norm is not None else float("nan"),
                     samples, padded, real, masked,
                     torch.cat(seen) if seen else torch.zeros(0, 3, dtype=torch.float64))


def _cached_step(engine: Any, query: dict, passage: dict, chunk_size: int,
                 batch_loss: Callable[[torch.Tensor, torch.Tensor], LossOutput],
                 ) -> tuple[LossOutput, torch.Tensor, torch.Tensor, int]:
    """GradCache on one micro-batch; also returns the padded tokens of one pass over it."""
    tokens: list[int] = []

    def encode(q: dict, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = engine(q, p)
        tokens.append(engine.module.processed_tokens)
        return embeddings

    chunks = split_chunks(query, passage, chunk_size)
    out, q, p = cached_backward(encode, chunks, batch_loss, engine.backward, engine.device)
    return out, q, p, sum(tokens[:len(chunks)])

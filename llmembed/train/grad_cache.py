"""GradCache: the exact gradient of a large contrastive batch at the memory of a small chunk.

Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv 2101.06983). A contrastive loss couples every query with every passage of the batch, so
the batch cannot be split into independent micro-batches (each would see fewer negatives).
GradCache splits the encoder's work instead:

1. encode the batch chunk by chunk without a graph, keeping only the embeddings and the RNG
   state each chunk started from;
2. compute the loss on the whole (cross-device gathered) batch from those embeddings, made
   leaves, and back-propagate it to them: the gradient of the loss with respect to every
   embedding, a tensor the size of the embeddings;
3. encode each chunk again, now with a graph, from the same RNG state (so dropout draws the
   same masks), and back-propagate ``sum(embedding * cached gradient)``, whose gradient with
   respect to the weights is the chunk's exact share of the full loss's gradient.

The last chunk is encoded with its graph already in step 1 and kept: its step-3 backward uses
that graph instead of encoding it again, so a batch of ``n`` chunks costs ``n - 1`` extra
forward passes, not ``n`` (one chunk costs exactly the plain step), while at most one chunk's
graph is alive at any time, as before.

Step 3's backward passes are ordinary backward calls on the encoder, one per chunk. Under
DeepSpeed they go through ``engine.backward`` with ``managed_gradient_accumulation: false``,
so the engine accumulates them like micro-batches and the caller's one ``engine.step()`` is the
boundary; nothing runs inside another backward, which is what broke the peers' cached losses
under ZeRO ("gradient computed twice for this partition"). This module holds the algorithm and
knows nothing of DeepSpeed: the encoder and the backward are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from llmembed.losses.base import LossOutput

Batch = dict[str, torch.Tensor]
Encode = Callable[[Batch, Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Chunk:
    """Rows ``[start, stop)`` of the queries and their passage groups."""

    query: Batch
    passage: Batch


def split_chunks(query: Batch, passage: Batch, chunk_size: int) -> list[Chunk]:
    """Consecutive chunks of ``chunk_size`` queries, each with its queries' passage groups
    (passages come grouped per query, ``group`` rows each)."""
    rows = query["input_ids"].shape[0]
    group = passage["input_ids"].shape[0] // max(rows, 1)
    chunks = []
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        chunks.append(Chunk({k: v[start:stop] for k, v in query.items()},
                            {k: v[start * group:stop * group] for k, v in passage.items()}))
    return chunks


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(encode: Encode, chunks: list[Chunk], loss_of: Callable[[torch.Tensor, torch.Tensor], LossOutput],
                    backward: Callable[[torch.Tensor], object], device: torch.device,
                    ) -> tuple[LossOutput, torch.Tensor, torch.Tensor]:
    """Run steps 1-3 (module docstring); returns the loss output (its loss detached) and the
    batch's query and passage embeddings (detached).

    ``loss_of(queries, passages)`` is the whole batch's loss; it may gather across ranks with
    gradients (every rank calls this alike). ``backward(surrogate)`` back-propagates one
    chunk's surrogate, e.g. ``engine.backward``; whatever scaling the caller wants (gradient
    accumulation) it applies there. The global RNG ends where the first pass left it.
    """
    *replayed, last = chunks
    states, queries, passages = [], [], []
    with torch.no_grad():
        for chunk in replayed:
            states.append(_rng_state(device))
            q, p = encode(chunk.query, chunk.passage)
            queries.append(q)
            passages.append(p)
    last_query, last_passage = encode(last.query, last.passage)  # its graph serves step 3
    queries.append(last_query.detach())
    passages.append(last_passage.detach())
    after_first_pass = _rng_state(device)
    query_leaf = torch.cat(queries).detach().requires_grad_()
    passage_leaf = torch.cat(passages).detach().requires_grad_()
    out = loss_of(query_leaf, passage_leaf)
    query_grad, passage_grad = torch.autograd.grad(out.loss, [query_leaf, passage_leaf], allow_unused=True)
    query_grad = torch.zeros_like(query_leaf) if query_grad is None else query_grad
    passage_grad = torch.zeros_like(passage_leaf) if passage_grad is None else passage_grad

    def surrogate(q: torch.Tensor, p: torch.Tensor, q_start: int, p_start: int) -> torch.Tensor:
        """``sum(embedding * cached gradient)`` over the rows this chunk produced."""
        q_grad = query_grad[q_start:q_start + q.shape[0]]
        p_grad = passage_grad[p_start:p_start + p.shape[0]]
        return (q.float() * q_grad.float()).sum() + (p.float() * p_grad.float()).sum()

    backward(surrogate(last_query, last_passage, query_leaf.shape[0] - last_query.shape[0],
                       passage_leaf.shape[0] - last_passage.shape[0]))
    del last_query, last_passage  # the kept graph is freed before the next one is built
    q_start = p_start = 0
    for chunk, state in zip(replayed, states):
        _set_rng_state(state, device)
        q, p = encode(chunk.query, chunk.passage)
        backward(surrogate(q, p, q_start, p_start))
        q_start, p_start = q_start + q.shape[0], p_start + p.shape[0]
    _set_rng_state(after_first_pass, device)
    return replace(out, loss=out.loss.detach()), query_leaf.detach(), passage_leaf.detach()

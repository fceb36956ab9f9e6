"""Gather embeddings across ranks with gradients.

Forward: all-gather every rank's tensor. Backward: sum the incoming gradient over ranks
(all-reduce) and keep this rank's slice. Each rank's loss then back-propagates into every
rank's embeddings, and after DeepSpeed averages parameter gradients over ranks the result is
exactly the gradient of the mean loss over the global batch, the same as one process seeing
the concatenated batch. Written with plain all-gather/all-reduce so it also runs on gloo (CPU),
which has no reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks along dim 0, differentiably."""
    _, size = world()
    if size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a detached scalar over ranks (for logging)."""
    _, size = world()
    value = value.detach().clone().float()
    if size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= size
    return value


def leave_process_group() -> None:
    """Every rank leaves the process group together at the end of a run. A process that exits
    with the group still up can abort in teardown ("terminate called without an active
    exception" from a communication thread), turning a finished run into a failed launch."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""Gather embeddings across ranks with gradients.

Forward: all-gather every rank's tensor. Backward: sum the incoming gradient over ranks
(all-reduce) and keep this rank's slice. Each rank's loss then back-propagates into every
rank's embeddings, and after DeepSpeed averages parameter gradients over ranks the result is
exactly the gradient of the mean loss over the global batch, the same as one process seeing
the concatenated batch. Written with plain all-gather/all-reduce so it also runs on gloo (CPU),
which has no reduce-scatter.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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


def leave_group_and_exit() -> None:
    """Every rank leaves the process group together at the end of a run, and a process of a
    group of several then ends at once, without the interpreter's teardown.

    That teardown aborts now and then in a C++ thread's destructor ("terminate called without
    an active exception", exit -6: seen on a rank of a 2-process run whose work was done, with
    the group already left), and the launcher then reports a finished run as failed. Callers
    have written and closed everything by now; standard streams and logging are flushed here."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    several = dist.get_world_size() > 1
    dist.barrier()
    dist.destroy_process_group()
    if several:
        import logging
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@dataclass(frozen=True)
class Shard:
    """This process's share of a job split over ``count`` processes launched like training
    (torchrun or deepspeed set ``RANK`` and ``WORLD_SIZE``): work item ``n`` is this process's
    when ``n % count == index``. The first process leads: it waits for the others' shares and
    finishes the job alone."""

    index: int = 0
    count: int = 1

    @property
    def leads(self) -> bool:
        return self.index == 0

    def owns(self, item: int) -> bool:
        return item % self.count == self.index

    @classmethod
    def from_launcher(cls) -> "Shard":
        """One process: ``Shard()``. Several: joins their process group (gloo, CPU), with a
        day's timeout, since the leader's wait at :meth:`wait_for_all` lasts as long as the
        slowest share of the encoding."""
        count = int(os.environ.get("WORLD_SIZE", "1"))
        if count == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
        return cls(dist.get_rank(), dist.get_world_size())

    def wait_for_all(self) -> None:
        if self.count > 1:
            dist.barrier()

    def total(self, value: int) -> int:
        """``value`` summed over the processes (each counts its own share)."""
        if self.count == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return int(tensor.item())

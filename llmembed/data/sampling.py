"""Homogeneous, weighted, resumable batch sampling.

Every global batch (all ranks together) comes from one dataset, so in-batch negatives are
meaningful and one task's instructions apply. Which dataset serves a step is drawn with
probability proportional to its weight. The whole schedule is a pure function of
``(seed, epoch, step)``: resuming needs only the step counter, and every rank computes the
same global batch and takes its own slice, so rank ``r`` of ``W`` holds rows
``[r*B, (r+1)*B)`` of the batch a single process with batch ``W*B`` would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchRef:
    dataset: int
    indices: tuple[int, ...]  # this rank's rows
    epoch: int
    step: int


class HomogeneousBatchSampler:
    def __init__(self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shared: list[bool] | None = None) -> None:
        """``shared[i]``: dataset ``i``'s batches are the same rows on every rank (Conan's
        balancing: one local batch of queries, each rank its own negatives); the others'
        batches are ``global_batch_size`` distinct rows."""
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per dataset is needed")
        self.local = global_batch_size // world_size
        self.shared = [bool(x) and world_size > 1 for x in (shared or [False] * len(sizes))]
        self.rows_per_batch = [self.local if sh else global_batch_size for sh in self.shared]
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("at least one dataset needs a positive weight")
        for i, (size, weight) in enumerate(zip(sizes, weights)):
            if weight < 0:
                raise ValueError(f"data.datasets[{i}].weight must be >= 0, got {weight}")
            if weight > 0 and size < self.rows_per_batch[i]:
                raise ValueError(
                    f"data.datasets[{i}] has {size} records, fewer than one global batch ({self.rows_per_batch[i]})"
                )
        self.sizes = sizes
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.batch = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # An epoch is as many steps as the used datasets' rows fill; a shared dataset's batch
        # takes one local batch of its rows, so its rows count world_size times.
        rows = sum(s * (world_size if sh else 1) for s, sh, w in zip(sizes, self.shared, weights) if w > 0)
        self.steps_per_epoch = max(1, rows // global_batch_size)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _epoch_plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        choices = self._rng(epoch, 0).choice(len(self.sizes), size=self.steps_per_epoch, p=self.probs)
        cursors = [0] * len(self.sizes)
        cycles = [0] * len(self.sizes)
        orders: dict[tuple[int, int], np.ndarray] = {}
        plan = []
        for ds in choices:
            ds = int(ds)
            batch = self.rows_per_batch[ds]
            if cursors[ds] + batch > self.sizes[ds]:
                cycles[ds] += 1
                cursors[ds] = 0
            key = (ds, cycles[ds])
            if key not in orders:
                orders[key] = self._rng(epoch, 1, ds, cycles[ds]).permutation(self.sizes[ds])
            rows = orders[key][cursors[ds] : cursors[ds] + batch].tolist()
            cursors[ds] += batch
            plan.append((ds, rows))
        return plan

    def global_batch(self, step: int) -> tuple[int, list[int], int]:
        """(dataset, all rows of the global batch, epoch) for global step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        ds, rows = self._epoch_plan(epoch)[within]
        return ds, rows, epoch

    def batches(self, start_step: int = 0):
        """Endless iterator of this rank's :class:`BatchRef`, starting at ``start_step``."""
        step = start_step
        plan_epoch, plan = -1, []
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, self._epoch_plan(epoch)
            ds, rows = plan[within]
            mine = rows if self.shared[ds] else rows[self.rank * self.local : (self.rank + 1) * self.local]
            yield BatchRef(ds, tuple(mine), epoch, step)
            step += 1

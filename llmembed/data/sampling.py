"""Homogeneous, weighted, resumable batch sampling.

Every global batch (all ranks together) comes from one dataset, so in-batch negatives are
meaningful and one task's instructions apply. Which dataset serves a step is drawn with
probability proportional to its weight. The whole schedule is a pure function of
``(seed, epoch, step)``: resuming needs only the step counter, and every rank computes the
same global batch and takes its own slice, so rank ``r`` of ``W`` holds rows
``[r*B, (r+1)*B)`` of the batch a single process with batch ``W*B`` would see.

Length grouping (``lengths``): each pass over a dataset is shuffled as usual, then cut into
windows of ``window`` batches; each window is sorted by length and cut into batches, and the
batches of the pass are shuffled again. A batch then holds texts of similar length, so little
of it is padding, while which records meet in a batch stays random at the window's scale
(the idea of transformers' ``LengthGroupedSampler``, kept a pure function of seed and step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

SUB_BATCHES = 4  # length grouping: batches sorted together by the second length


def record_lengths(records: Iterable, count_tokens: Callable[[list[str]], list[int]],
                   passage_cap: int | None = None, query_cap: int | None = None) -> np.ndarray:
    """Per record, the lengths to group batches by: ``(longest passage, query)`` in tokens,
    capped at the training cuts (texts cut to the same length pad alike). Queries and passages
    are padded separately, so both are grouped, passages first (``group_size`` of them per
    query). Tokens and not characters: 30 characters of chatterbot answers run from 7 to 14
    tokens, too loose to group by."""
    return capped_lengths(token_lengths(records, count_tokens), passage_cap, query_cap)


def token_lengths(records: Iterable, count_tokens: Callable[[list[str]], list[int]],
                  chunk: int = 4096) -> np.ndarray:
    """Uncapped ``(longest passage, query)`` token counts per record (int32), counted
    ``chunk`` records at a time so that memory stays flat however many records there are;
    the training store keeps them beside the data, keyed by the tokenizer."""
    rows: list[np.ndarray] = []
    part: list = []

    def count(part: list) -> np.ndarray:
        texts = list(dict.fromkeys(t for r in part for t in (r.query, *r.positives, *r.negatives)))
        counts = dict(zip(texts, count_tokens(texts)))
        return np.asarray([(max((counts[t] for t in (*r.positives, *r.negatives)), default=0), counts[r.query])
                           for r in part], dtype=np.int32).reshape(-1, 2)

    for record in records:
        part.append(record)
        if len(part) == chunk:
            rows.append(count(part))
            part = []
    if part or not rows:
        rows.append(count(part))
    return np.concatenate(rows)


def capped_lengths(lengths: np.ndarray, passage_cap: int | None = None, query_cap: int | None = None) -> np.ndarray:
    """``lengths`` with passages cut at ``passage_cap`` and queries at ``query_cap`` (a copy
    only when there is a cut to make)."""
    if passage_cap is None and query_cap is None:
        return lengths
    big = np.iinfo(np.int32).max
    return np.minimum(lengths, np.asarray([passage_cap or big, query_cap or big], dtype=np.int32))


@dataclass(frozen=True)
class BatchRef:
    dataset: int
    indices: tuple[int, ...]  # this rank's rows
    epoch: int
    step: int


class HomogeneousBatchSampler:
    def __init__(self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shared: list[bool] | None = None,
                 lengths: list[np.ndarray | None] | None = None, window: int = 32) -> None:
        """``shared[i]``: dataset ``i``'s batches are the same rows on every rank (Conan's
        balancing: one local batch of queries, each rank its own negatives); the others'
        batches are ``global_batch_size`` distinct rows. ``lengths[i]``: a length per row of
        dataset ``i`` to group its batches by (None: no grouping), ``window`` batches at a time."""
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
        self.lengths = list(lengths) if lengths is not None else [None] * len(sizes)
        if len(self.lengths) != len(sizes) or any(
                length is not None and len(length) != size for length, size in zip(self.lengths, sizes)):
            raise ValueError("lengths: one length per record of each dataset (or None)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
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

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
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
                orders[key] = self._order(epoch, ds, cycles[ds])
            # A view into the pass's order, not a list: an epoch's plan of a million records
            # would otherwise hold a million Python ints in every rank.
            rows = orders[key][cursors[ds] : cursors[ds] + batch]
            cursors[ds] += batch
            plan.append((ds, rows))
        return plan

    def _order(self, epoch: int, ds: int, cycle: int) -> np.ndarray:
        """Dataset ``ds``'s rows for one pass: a permutation, length-grouped when asked."""
        order = self._rng(epoch, 1, ds, cycle).permutation(self.sizes[ds])
        lengths = self.lengths[ds]
        if lengths is None:
            return order
        lengths = np.asarray(lengths).reshape(len(order), -1)
        batch = self.rows_per_batch[ds]
        span = batch * self.window
        # Each window longest first by the first column (stable: ties keep the shuffled order);
        # then, in runs of SUB_BATCHES batches of similar first lengths, by the second column.
        parts = []
        for window in np.split(order, range(span, len(order), span)):
            window = window[np.argsort(-lengths[window, 0], kind="stable")]
            for run in np.split(window, range(batch * SUB_BATCHES, len(window), batch * SUB_BATCHES)):
                parts.append(run[np.argsort(-lengths[run, -1], kind="stable")])
        grouped = np.concatenate(parts)
        full = len(grouped) // batch
        batches = grouped[: full * batch].reshape(full, batch)
        shuffled = batches[self._rng(epoch, 2, ds, cycle).permutation(full)]
        return np.concatenate([shuffled.reshape(-1), grouped[full * batch:]])

    def global_batch(self, step: int) -> tuple[int, list[int], int]:
        """(dataset, all rows of the global batch, epoch) for global step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        ds, rows = self._epoch_plan(epoch)[within]
        return ds, rows.tolist(), epoch

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
            yield BatchRef(ds, tuple(mine.tolist()), epoch, step)
            step += 1

"""Turn a sampled batch of records into model inputs.

Per query: one positive and ``group_size - 1`` hard negatives, sampled afresh every epoch
from a generator seeded by ``(seed, epoch, dataset, row)`` so any rank, any restart and a
single-process run draw the same ones. A record with fewer negatives than needed repeats its
own; one with none borrows positives of other records of the same dataset (random negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmembed.data.sampling import BatchRef
from llmembed.data.schema import Record


@dataclass
class LoadedDataset:
    name: str
    records: list[Record]
    instruction: str | None
    in_batch_negatives: bool
    group_size: int
    loss: str  # "infonce" or "cosent"


class ContrastiveCollator:
    def __init__(self, model, datasets: list[LoadedDataset], seed: int = 0) -> None:
        self.model = model
        self.datasets = datasets
        self.seed = seed

    def _group(self, ds_index: int, row: int, epoch: int) -> tuple[str, list[str]]:
        ds = self.datasets[ds_index]
        record = ds.records[row]
        rng = np.random.default_rng([self.seed, epoch, ds_index, row])
        positive = record.positives[int(rng.integers(len(record.positives)))]
        need = ds.group_size - 1
        if need == 0:
            return positive, []
        if len(record.negatives) >= need:
            picks = rng.choice(len(record.negatives), size=need, replace=False)
            return positive, [record.negatives[int(i)] for i in picks]
        if record.negatives:
            picks = rng.choice(len(record.negatives), size=need, replace=True)
            return positive, [record.negatives[int(i)] for i in picks]
        negatives = []
        while len(negatives) < need:
            other = int(rng.integers(len(ds.records)))
            if other != row:
                pool = ds.records[other].positives
                negatives.append(pool[int(rng.integers(len(pool)))])
        return positive, negatives

    def __call__(self, ref: BatchRef) -> dict:
        ds = self.datasets[ref.dataset]
        records = [ds.records[i] for i in ref.indices]
        instructions = [r.instruction or ds.instruction for r in records]
        queries = self.model.tokenize([r.query for r in records], instructions, is_query=True)
        passages: list[str] = []
        for row in ref.indices:
            positive, negatives = self._group(ref.dataset, row, ref.epoch)
            passages += [positive, *negatives]
        batch = {
            "query": queries,
            "passage": self.model.tokenize(passages, is_query=False),
            "group_size": ds.group_size,
            "in_batch_negatives": ds.in_batch_negatives,
            "loss": ds.loss,
            "dataset": ref.dataset,
        }
        if ds.loss == "cosent":
            batch["scores"] = torch.tensor([r.score for r in records], dtype=torch.float32)
        return batch

"""Hard negatives re-mined during training, as Conan-embedding does (Li et al., 2024,
"Conan-embedding: General Text Embedding with More and Better Negative Samples",
arXiv 2408.15710).

Negatives mined once, by another model, go stale: as the student learns, most of them stop
being hard and the loss stops learning from them. Conan tracks each record's mean negative
score under the model being trained and, every N steps, re-mines the records whose negatives
got easy (score x 1.15 below the score they started with, and |score| below 0.8) with the
current model.

Here the scores come for free from the training batches (the query's cosine with its own hard
negatives, gathered over ranks), so every rank holds the same table. Every ``remine.every``
steps the stale records are re-mined by :func:`llmembed.mine.mine` (faiss, rank window,
positive-aware rule) with the in-memory model over the dataset's own texts or a given corpus;
the ranks share the encoding (each an equal slice, gathered) and then run the same search. A re-mined record starts its score history afresh. Re-mined negatives have no
teacher scores: with ``teacher_scores`` distillation their rows sit it out.

The table and the replaced negatives are part of every checkpoint (``remine_state.json``), so
a killed run resumes with the negatives and scores it had.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from llmembed.config import bounded, check_ranges
from llmembed.data.collate import LoadedDataset
from llmembed.mine import MineSettings, mine, read_corpus
from llmembed.serve.encoders import TextEncoder
from llmembed.train import checkpoint

STATE_FILE = "remine_state.json"


@dataclass
class RemineConfig:
    """The ``remine:`` section of a training config."""

    every: int = bounded(0, ge=0)  # optimizer steps between re-minings; 0: off (Conan uses 100)
    # A record is stale when score * ratio < its first score and |score| < max_score, where
    # score is the mean cosine of the query with its hard negatives, as last seen in training
    # (for a negative score the margin is taken on |score|).
    ratio: float = bounded(1.15, gt=0.0)
    max_score: float = bounded(0.8, gt=0.0)
    # As llmembed.mine: the rank window (after the record's own positives and query are set
    # aside) and the positive-aware rule (null: plain top-k).
    rank_start: int = bounded(10, ge=0)
    rank_end: int = bounded(100, ge=1)
    positive_ratio: float | None = bounded(0.95, gt=0.0)
    # JSONL ({"text": ...} lines or records) searched for negatives; null: every positive and
    # negative of the dataset being re-mined.
    corpus: str | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rank_start >= self.rank_end:
            raise ValueError(f"rank_start ({self.rank_start}) must be below rank_end ({self.rank_end})")

    @property
    def enabled(self) -> bool:
        return self.every > 0


class RankShardedEncoder:
    """A :class:`~llmembed.serve.encoders.TextEncoder` whose work is split over the ranks: each encodes
    an equal slice of the texts (the last one padded, so every rank runs as many forwards,
    which ZeRO-3 needs) and the vectors are gathered, so every rank gets them all."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.fingerprint = inner.name, inner.fingerprint

    def encode_passages(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self._sharded(list(texts), [None] * len(texts), lambda t, _: self.inner.encode_passages(t))

    def encode_queries(self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None,
                       progress: bool = False) -> np.ndarray:
        instructions = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction] * len(texts)
        return self._sharded(list(texts), instructions, self.inner.encode_queries)

    def _sharded(self, texts: list[str], extra: list, encode: Callable[[list[str], list], np.ndarray]) -> np.ndarray:
        import torch.distributed as dist

        size = dist.get_world_size() if dist.is_initialized() else 1
        if size == 1 or not texts:
            return encode(texts, extra)
        share = -(-len(texts) // size)
        rank = dist.get_rank()
        rows = [min(i, len(texts) - 1) for i in range(rank * share, (rank + 1) * share)]
        mine = torch.from_numpy(np.ascontiguousarray(encode([texts[i] for i in rows], [extra[i] for i in rows])))
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine)
        return torch.cat(parts)[: len(texts)].numpy()


def eligible(ds: LoadedDataset) -> bool:
    """Datasets whose groups carry hard negatives: a loss that takes them, with a group above 1."""
    return ds.loss.hard_negatives and ds.group_size > 1


class HardNegativeRefresher:
    """The score table and the re-mining; one per process, identical on every rank."""

    def __init__(self, config: RemineConfig, datasets: list[LoadedDataset]) -> None:
        self.config = config
        self.datasets = datasets
        self.corpora: dict[int, list[str]] = {}
        for d, ds in enumerate(datasets):
            if not eligible(ds):
                continue
            if config.corpus is not None:
                corpus = read_corpus(config.corpus)
            else:
                corpus = list(dict.fromkeys(t for r in ds.records for t in (*r.positives, *r.negatives)))
            if len(corpus) < config.rank_end:
                raise ValueError(f"remine: the corpus for dataset {ds.name} has {len(corpus)} passages, fewer than "
                                 f"remine.rank_end ({config.rank_end}); lower it or give remine.corpus")
            self.corpora[d] = corpus
        self.initial: dict[tuple[int, int], float] = {}
        self.latest: dict[tuple[int, int], float] = {}
        self.replaced: dict[tuple[int, int], list[str]] = {}
        self.total = 0

    def observe(self, seen: torch.Tensor) -> None:
        """Take this rank's ``(dataset, row, mean negative cosine)`` rows of a step, gathered
        over ranks (a collective: every rank calls it every step, with as many rows)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(seen) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, seen.contiguous())
            seen = torch.cat(parts)
        scores: dict[tuple[int, int], list[float]] = {}
        for d, row, score in seen.tolist():  # with shared queries every rank scores its own negatives
            scores.setdefault((int(d), int(row)), []).append(score)
        for key, values in scores.items():
            if key[0] in self.corpora and self.datasets[key[0]].records[key[1]].negatives:
                score = sum(values) / len(values)
                self.initial.setdefault(key, score)
                self.latest[key] = score

    def stale(self) -> list[tuple[int, int]]:
        """Records whose score fell by more than ``ratio`` (score x 1.15 < first score, with the
        margin taken on |score| so that a negative score is not stale at first sight) and is
        below ``max_score`` in magnitude."""
        c = self.config
        return sorted(k for k, s in self.latest.items()
                      if s + (c.ratio - 1) * abs(s) < self.initial[k] and abs(s) < c.max_score)

    def refresh(self, model: Any, step: int) -> int:
        """Re-mine every stale record with ``model`` (the in-memory model being trained);
        returns how many got new negatives. Every rank calls it at the same step."""
        stale = self.stale()
        if not stale:
            return 0
        c, changed = self.config, 0
        numbers, tensors = checkpoint.rng_state()
        try:
            with torch.no_grad():
                for d in sorted({d for d, _ in stale}):
                    ds, rows = self.datasets[d], [r for dd, r in stale if dd == d]
                    records = [ds.records[r] for r in rows]
                    settings = MineSettings(c.rank_start, c.rank_end, max(len(r.negatives) for r in records),
                                            c.positive_ratio, instruction=ds.instruction)
                    encoder = RankShardedEncoder(TextEncoder.of(model, f"step-{step}"))
                    mined, _ = mine(records, self.corpora[d], encoder, settings)
                    for row, record in zip(rows, mined):
                        self.initial.pop((d, row), None)  # its new negatives start a new history
                        self.latest.pop((d, row), None)
                        if record.negatives and record.negatives != ds.records[row].negatives:
                            self._apply(d, row, record.negatives)
                            changed += 1
        finally:
            checkpoint.set_rng_state(numbers, tensors)
            model.train()
        self.total += changed
        return changed

    def _apply(self, d: int, row: int, negatives: list[str]) -> None:
        ds = self.datasets[d]
        ds.records[row] = replace(ds.records[row], negatives=list(negatives))
        if ds.teacher is not None:
            ds.teacher[row] = None  # the teacher never scored these
        self.replaced[(d, row)] = list(negatives)

    def state(self) -> str:
        def rows(table: dict) -> list:
            return [[d, r, v] for (d, r), v in sorted(table.items())]

        return json.dumps({"initial": rows(self.initial), "latest": rows(self.latest),
                           "replaced": rows(self.replaced), "total": self.total})

    def load(self, folder: Path) -> None:
        """Restore what the checkpoint in ``folder`` held (nothing there: a fresh start)."""
        path = folder / STATE_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.initial = {(d, r): v for d, r, v in state["initial"]}
        self.latest = {(d, r): v for d, r, v in state["latest"]}
        for d, r, negatives in state["replaced"]:
            self._apply(d, r, negatives)
        self.total = int(state["total"])

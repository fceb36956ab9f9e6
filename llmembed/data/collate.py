"""Turn a sampled batch of records into model inputs.

Per query: one positive and ``group_size - 1`` hard negatives, sampled afresh every epoch
from a generator seeded by ``(seed, epoch, dataset, row)`` so any rank, any restart and a
single-process run draw the same ones. A record with fewer negatives than needed repeats its
own; one with none borrows positives of other records of the same dataset (random negatives).
With shared queries (Conan's balancing) rank ``r`` of ``W`` draws from negatives
``r, r+W, ...`` of each record, so the ranks' negatives are distinct.

For a dataset that distils a teacher (``teacher_scores``), each group also carries the
teacher's scores of its passages, read from the records' ``meta.mining`` (written by
``llmembed.mine``); a record mining left without negatives borrows random ones, which the
teacher never scored, and its row (NaN) sits the distillation out.

Texts become tokens through the model's :class:`~llmembed.tokenization.EmbeddingTokenizer`
(prompts, EOS, padding side from the serving contract), never through the model itself.
Training may cut queries and passages shorter than the serving length to save compute.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import torch

from llmembed.data.masking import TokenMasking, mask_tokens
from llmembed.data.sampling import BatchRef
from llmembed.data.schema import Record
from llmembed.tokenization import EmbeddingTokenizer


class BatchShape(Enum):
    """What a loss is fed, which decides how the collator tokenises a batch."""

    # Queries (with their instructions) and, per query, a positive and its negatives.
    PAIRS = "pairs"
    # Each text twice, both as passages without instruction: two views told apart by dropout.
    VIEWS = "views"
    # Each text once, masked, with per-token labels (a token-level loss).
    TOKENS = "tokens"


class LossFacts(Protocol):
    """What loading and collating ask of a dataset's loss (a class registered in
    :mod:`llmembed.losses`), so that no layer below the losses switches on a loss's name."""

    name: str
    batch_shape: BatchShape
    hard_negatives: bool  # groups of a positive and hard negatives (data.group_size)
    teacher_scores: bool  # may distil a teacher's scores of each group (datasets' teacher_scores)
    embedding_teacher: bool  # reads an embedding teacher's vectors of the batch's texts


@dataclass
class LoadedDataset:
    name: str
    # A list in tests; a memory-mapped table (llmembed.data.store.RecordTable) when training.
    records: Sequence[Record]
    instruction: str | None
    in_batch_negatives: bool
    group_size: int
    loss: LossFacts  # the loss class, chosen once when the dataset is loaded
    # Per record: the teacher's score of its positive, then of each negative; a record without
    # negatives has None (its group borrows unscored negatives and sits out the distillation).
    # None for the whole list: no distillation.
    teacher: Sequence[list[float] | None] | None = None
    # Conan's cross-rank balancing (data.balanced_ranks): every rank takes the same queries
    # and positives of a batch and draws its own share of the hard negatives.
    shared_queries: bool = False


# Where each teacher's scores live in a record's meta: (section, positive score, negative scores).
TEACHER_KEYS = {"embedding": ("mining", "positive_score", "negative_scores"),
                "reranker": ("mining", "reranker_positive_score", "reranker_negative_scores"),
                # synth.relabel: the generator LLM's query likelihood of each candidate
                "llm": ("relabel", "positive_score", "negative_scores")}
WRITTEN_BY = {"embedding": "llmembed.mine", "reranker": "llmembed.mine --cross-encoder", "llm": "synth.relabel"}


class ScoreTable:
    """Per record, the teacher's ``[positive, *negatives]`` scores, or None: two flat arrays
    (float32 scores, int64 row offsets) rather than a Python list per record, so a million
    distilled records cost about 24 bytes each instead of some 150. Re-mining replaces a
    record's scores with None (the teacher never scored its new negatives)."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray) -> None:
        self.offsets, self.values = offsets, values
        self.changed: dict[int, list[float] | None] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> list[float] | None:
        if row in self.changed:
            return self.changed[row]
        start, end = self.offsets[row], self.offsets[row + 1]
        return self.values[start:end].tolist() if end > start else None

    def __setitem__(self, row: int, scores: list[float] | None) -> None:
        self.changed[row] = scores


def teacher_scores(records: Iterable[Record], source: str, where: str) -> ScoreTable:
    """``[positive, *negatives]`` teacher scores per record from its meta (``source``: the
    mining model's ``embedding`` scores or the cross-encoder's ``reranker`` scores in
    ``meta.mining``, the LLM judge's ``llm`` scores in ``meta.relabel``); None for a record that
    has no negatives (mining found none outside the positive-aware rule)."""
    if source not in TEACHER_KEYS:
        raise ValueError(f"{where}: teacher_scores must be one of {sorted(TEACHER_KEYS)}, got {source!r}")
    section, positive_key, negative_key = TEACHER_KEYS[source]
    offsets, values = array("q", [0]), array("f")
    for number, record in enumerate(records, start=1):
        if not record.negatives:
            offsets.append(len(values))
            continue
        scores = record.meta.get(section) or {}
        positive, negatives = scores.get(positive_key), scores.get(negative_key)
        problem = None
        if not isinstance(positive, (int, float)):
            problem = f"meta.{section}.{positive_key} is missing"
        elif not isinstance(negatives, list) or len(negatives) != len(record.negatives):
            problem = f"meta.{section}.{negative_key} does not give one score per negative"
        elif any(not isinstance(x, (int, float)) for x in negatives):
            problem = f"meta.{section}.{negative_key} has a negative without a score (kept from before mining?)"
        if problem:
            raise ValueError(f"{where}: record {number} (query {record.query[:40]!r}): {problem}; write it with "
                             f"{WRITTEN_BY[source]} or drop teacher_scores")
        values.append(float(positive))
        values.extend(map(float, negatives))
        offsets.append(len(values))
    return ScoreTable(np.frombuffer(offsets, dtype=np.int64), np.frombuffer(values, dtype=np.float32))


class ContrastiveCollator:
    def __init__(self, text_tokenizer: EmbeddingTokenizer, datasets: list[LoadedDataset], seed: int = 0,
                 query_max_length: int | None = None, passage_max_length: int | None = None,
                 teacher_encoder=None, rank: int = 0, world_size: int = 1,
                 token_masking: TokenMasking | None = None) -> None:
        """``teacher_encoder`` (a :class:`llmembed.serve.encoders.TextEncoder`): adds the teacher's
        normalised vectors of every InfoNCE batch's raw texts (``teacher_query``,
        ``teacher_passage``), for structure distillation and guided masking."""
        serving = text_tokenizer.contract.max_length
        for name, value in (("query_max_length", query_max_length), ("passage_max_length", passage_max_length)):
            if value is not None and not 2 <= value <= serving:
                raise ValueError(f"data.{name}={value} must be between 2 and the model's max_length ({serving})")
        for ds in datasets:
            # Random negatives are other records' positives: a lone record without hard
            # negatives has none to borrow (this used to loop forever).
            if ds.group_size > 1 and len(ds.records) < 2 and not all(r.negatives for r in ds.records):
                raise ValueError(f"dataset {ds.name}: group_size {ds.group_size} needs hard negatives or at least "
                                 f"2 records to borrow random negatives from; it has {len(ds.records)} record(s) "
                                 "without negatives (set group_size: 1 or add negatives)")
        self.text_tokenizer = text_tokenizer
        self.datasets = datasets
        self.seed = seed
        self.query_max_length = query_max_length or serving
        self.passage_max_length = passage_max_length or serving
        self.teacher_encoder = teacher_encoder
        self.rank, self.world_size = rank, world_size
        self.token_masking = token_masking

    def _group(self, ds_index: int, row: int, epoch: int) -> tuple[str, list[str], list[int] | None]:
        """The positive, the negatives, and the negatives' indices in the record (None when
        they were borrowed from other records)."""
        ds = self.datasets[ds_index]
        record = ds.records[row]
        rng = np.random.default_rng([self.seed, epoch, ds_index, row])
        positive = record.positives[int(rng.integers(len(record.positives)))]
        need = ds.group_size - 1
        if need == 0:
            return positive, [], []
        pool = range(len(record.negatives))
        if ds.shared_queries and self.world_size > 1:
            # Same positive on every rank (drawn above); this rank's own stream and, where the
            # record has enough, its own share of the negatives, so ranks draw distinct ones.
            rng = np.random.default_rng([self.seed, epoch, ds_index, row, 1, self.rank])
            if len(record.negatives) >= self.world_size:
                pool = range(self.rank, len(record.negatives), self.world_size)
        if record.negatives:
            picks = [pool[int(i)] for i in rng.choice(len(pool), size=need, replace=len(pool) < need)]
            return positive, [record.negatives[i] for i in picks], picks
        negatives = []
        while len(negatives) < need:
            other = int(rng.integers(len(ds.records)))
            if other != row:
                pool = ds.records[other].positives
                negatives.append(pool[int(rng.integers(len(pool)))])
        return positive, negatives, None

    def _masked(self, ref: BatchRef, texts: list[str]) -> dict:
        """A token-level batch: the texts as passages, masked, with their labels."""
        m = self.token_masking
        if m is None:
            raise ValueError(f"dataset {self.datasets[ref.dataset].name}: a masked-token batch needs the collator's "
                             "token_masking")
        inputs = self.text_tokenizer(texts, is_query=False, max_length=self.passage_max_length)
        rngs = [np.random.default_rng([self.seed, ref.epoch, ref.dataset, row, 2]) for row in ref.indices]
        inputs["input_ids"], labels = mask_tokens(inputs["input_ids"], inputs["attention_mask"], m.special_ids,
                                                  m.mask_id, m.vocab_size, m.probability, rngs)
        return {"query": inputs, "labels": labels, "dataset": ref.dataset}

    def __call__(self, ref: BatchRef) -> dict:
        ds = self.datasets[ref.dataset]
        records = [ds.records[i] for i in ref.indices]
        if ds.loss.batch_shape is BatchShape.TOKENS:
            return self._masked(ref, [r.query for r in records])
        if ds.loss.batch_shape is BatchShape.VIEWS:  # two views of the same input, told apart by dropout alone
            queries = self.text_tokenizer([r.query for r in records], is_query=False,
                                          max_length=self.passage_max_length)
        else:
            instructions = [r.instruction or ds.instruction for r in records]
            queries = self.text_tokenizer([r.query for r in records], instructions, is_query=True,
                                          max_length=self.query_max_length)
        passages: list[str] = []
        teacher: list[list[float]] = []
        for row in ref.indices:
            positive, negatives, picks = self._group(ref.dataset, row, ref.epoch)
            passages += [positive, *negatives]
            if ds.teacher is not None:
                scores = ds.teacher[row]
                teacher.append([scores[0], *(scores[1 + i] for i in picks)] if scores is not None and picks is not None
                               else [float("nan")] * ds.group_size)
        batch = {
            "query": queries,
            "passage": self.text_tokenizer(passages, is_query=False, max_length=self.passage_max_length),
            "dataset": ref.dataset,  # the loss router binds group size and in-batch negatives to it
        }
        if ds.teacher is not None:
            batch["teacher_scores"] = torch.tensor(teacher, dtype=torch.float32)
        if self.teacher_encoder is not None and ds.loss.embedding_teacher:
            q = self.teacher_encoder.encode_queries([r.query for r in records])
            p = self.teacher_encoder.encode_passages(passages)
            batch["teacher_query"], batch["teacher_passage"] = torch.from_numpy(q), torch.from_numpy(p)
        if all(r.score is not None for r in records):
            batch["scores"] = torch.tensor([r.score for r in records], dtype=torch.float32)
        return batch

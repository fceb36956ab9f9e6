"""Retrieval scores on a held-out JSONL: each query searches all positives of the file.

Recall@1, MRR@10 and nDCG@10 with one relevant passage per query (its own positive); other
records' positives are the corpus, as in MS MARCO-style dev sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmembed.data.readers import read_jsonl
from llmembed.data.schema import Record


@dataclass
class RetrievalScores:
    recall_at_1: float
    mrr_at_10: float
    ndcg_at_10: float
    queries: int
    corpus: int

    def row(self) -> str:
        return (f"recall@1={self.recall_at_1:.4f}  mrr@10={self.mrr_at_10:.4f}  ndcg@10={self.ndcg_at_10:.4f}  "
                f"({self.queries} queries, {self.corpus} passages)")


def rank_of_positive(query_vectors: np.ndarray, corpus_vectors: np.ndarray, positive_ids: list[int]) -> np.ndarray:
    scores = query_vectors @ corpus_vectors.T
    own = scores[np.arange(len(positive_ids)), positive_ids]
    return (scores > own[:, None]).sum(axis=1) + 1  # 1-based; ties favour the positive


def evaluate_retrieval(model, data: str | Path | Sequence[Record], batch_size: int = 32) -> RetrievalScores:
    """Retrieval scores of ``model`` on held-out pairs: ``data`` is a JSONL path or its records."""
    records = read_jsonl(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError(f"{data if isinstance(data, (str, Path)) else 'evaluation data'}: no records to evaluate")
    corpus: list[str] = []
    index: dict[str, int] = {}
    positive_ids = []
    for r in records:
        text = r.positives[0]
        if text not in index:
            index[text] = len(corpus)
            corpus.append(text)
        positive_ids.append(index[text])
    instructions = [r.instruction for r in records]
    groups: dict[str | None, list[int]] = {}
    for i, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(i)
    queries = np.zeros((len(records), model.embedding_dim), dtype=np.float32)
    for instruction, rows in groups.items():
        queries[rows] = model.encode([records[i].query for i in rows], instruction=instruction, is_query=True,
                                     batch_size=batch_size)
    passages = model.encode(corpus, batch_size=batch_size)
    ranks = rank_of_positive(queries, passages, positive_ids)
    top10 = ranks <= 10
    return RetrievalScores(
        recall_at_1=float(np.mean(ranks == 1)),
        mrr_at_10=float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
        ndcg_at_10=float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1), 0.0))),
        queries=len(records),
        corpus=len(corpus),
    )

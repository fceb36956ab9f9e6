"""Conan's stale-negative rule and the re-mining state a checkpoint carries (the re-mining
itself, in real training processes, is in test_train_engine.py)."""

from __future__ import annotations

import pytest
import torch

from llmembed.losses import InfoNCE
from llmembed.data.collate import LoadedDataset
from llmembed.data.schema import Record
from llmembed.train.remine import HardNegativeRefresher, RemineConfig


def _dataset(n: int = 6) -> LoadedDataset:
    records = [Record(f"q{i}", [f"p{i}"], [f"n{i}a", f"n{i}b"]) for i in range(n)]
    records.append(Record("q-bare", ["p-bare"]))  # no negatives of its own: never tracked
    return LoadedDataset("d", records, None, True, 2, InfoNCE, teacher=[[0.9, 0.1, 0.2]] * (n + 1))


def _seen(rows: list[int], scores: list[float]) -> torch.Tensor:
    return torch.tensor([[0, r, s] for r, s in zip(rows, scores)], dtype=torch.float64)


def test_stale_records_follow_conans_rule():
    refresher = HardNegativeRefresher(RemineConfig(every=10, rank_start=0, rank_end=4), [_dataset()])
    refresher.observe(_seen([0, 1, 2, 3, 4, 5, 6], [0.60, 0.60, 0.90, -0.5, 0.60, -0.5, 0.9]))
    assert refresher.stale() == []  # first sight: the initial scores
    # 0: 0.5 * 1.15 = 0.575 < 0.6 and |0.5| < 0.8: stale.  1: 0.53 * 1.15 = 0.6095 > 0.6: kept.
    # 2: 0.78 * 1.15 < 0.9 and 0.78 < 0.8 -> stale; 3: -0.9 has |score| >= 0.8: kept.
    # 4: seen once more at its initial score: kept. 5: -0.5 -> -0.3 rose: kept.
    refresher.observe(_seen([0, 1, 2, 3, 4, 5], [0.50, 0.53, 0.78, -0.9, 0.60, -0.3]))
    assert refresher.stale() == [(0, 0), (0, 2)]
    # A score that crosses zero: -0.2 + 0.15 * 0.2 = -0.17 < 0.6: stale.
    refresher.observe(_seen([4], [-0.2]))
    assert refresher.stale() == [(0, 0), (0, 2), (0, 4)]
    assert (0, 6) not in refresher.latest


def test_the_state_restores_scores_and_replaced_negatives():
    config = RemineConfig(every=10, rank_start=0, rank_end=4)
    first = HardNegativeRefresher(config, [_dataset()])
    first.observe(_seen([0, 1], [0.6, 0.7]))
    first._apply(0, 1, ["p3", "n4a"])
    first.total = 1
    folder_state = first.state()
    dataset = _dataset()
    second = HardNegativeRefresher(config, [dataset])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "remine_state.json").write_text(folder_state)
        second.load(Path(tmp))
    assert second.state() == folder_state
    assert dataset.records[1].negatives == ["p3", "n4a"] and dataset.records[0].negatives == ["n0a", "n0b"]
    assert dataset.teacher[1] is None and dataset.teacher[0] == [0.9, 0.1, 0.2]  # never scored by the teacher


def test_a_corpus_smaller_than_the_rank_window_is_refused_up_front():
    with pytest.raises(ValueError, match=r"dataset d has 19 passages, fewer than remine.rank_end \(100\)"):
        HardNegativeRefresher(RemineConfig(every=5), [_dataset()])
    with pytest.raises(ValueError, match="rank_start"):
        RemineConfig(rank_start=5, rank_end=5)

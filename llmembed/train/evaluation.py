"""Evaluation during training: the offline suite (or a subset, or held-out record files) every
N steps, logged to TensorBoard and ``eval.jsonl``, with the best model kept on request.

Every rank runs the evaluation (under ZeRO-3 a forward gathers sharded weights collectively, so
all ranks must take part); rank 0 logs and writes. The RNG states are saved before and restored
after, so an evaluation leaves the training trajectory exactly as it was: a run with evaluation
has the losses of the same run without it, and resume stays exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmembed.config import bounded, check_ranges
from llmembed.evaluate import runner
from llmembed.evaluate.suite import SUITE
from llmembed.serve.encoders import TextEncoder
from llmembed.train import checkpoint
from llmembed.train.save import save_model


@dataclass
class EvalConfig:
    """The ``evaluation:`` section of a training config."""

    every: int = bounded(0, ge=0)  # optimizer steps; 0: only once, at the end
    tasks: list[str] = field(default_factory=list)  # offline-suite tasks, e.g. [ChatterbotRetrieval.en]
    data: list[str] = field(default_factory=list)  # held-out JSONL files, scored as retrieval
    keep_best: bool = False  # save the best model by the average main score to <output_dir>/best

    def __post_init__(self) -> None:
        check_ranges(self)
        unknown = [t for t in self.tasks if t not in SUITE]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; known: {list(SUITE)}")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.data)


class TrainingEvaluator:
    def __init__(self, config: EvalConfig, output_dir: Path, rank: int) -> None:
        self.config = config
        self.rank = rank
        self.best_dir = output_dir / "best"
        self.best_file = output_dir / "best.json"
        self.best = -math.inf
        if config.keep_best and self.best_file.is_file():  # a resumed run keeps the best so far
            self.best = float(json.loads(self.best_file.read_text())["average"])

    def due(self, step: int, total_steps: int) -> bool:
        every = self.config.every
        return self.config.enabled and (step == total_steps or (every > 0 and step % every == 0))

    def run(self, step: int, engine: Any, model: Any, run_log: Any) -> float:
        """Score the in-memory model at ``step``; log it; keep it if it is the best so far."""
        numbers, tensors = checkpoint.rng_state()
        try:
            with torch.no_grad():
                scores = runner.run(TextEncoder.of(model, f"step-{step}"), self.config.tasks, self.config.data)
        finally:
            checkpoint.set_rng_state(numbers, tensors)
            engine.train()
        average = _from_rank0(runner.average(scores))
        run_log.log_eval(step, scores, average)
        if self.config.keep_best and average > self.best:
            self.best = average
            save_model(engine, model, self.best_dir, self.rank)  # collective; every rank decided alike
            if self.rank == 0:
                self.best_file.write_text(json.dumps({"step": step, "average": average, "scores": scores}, indent=2))
        return average


def _from_rank0(value: float) -> float:
    """Rank 0's number on every rank, so collective decisions (saving the best) agree."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())

"""The training loop: a thin loop on ``deepspeed.initialize``.

DeepSpeed owns the optimizer step, LR schedule stepping, gradient accumulation, clipping,
bf16 and checkpoint files. The jobs around the loop live in their own modules:
:mod:`~llmembed.train.setup` (process group, data, model, engine, resume),
:mod:`~llmembed.train.step` (the contrastive step), :mod:`~llmembed.train.checkpoint` and
:mod:`~llmembed.train.save` (final model, probe, summary). This module only orders them:
step, log, checkpoint, repeat, then save.

A run is resumable after being killed at any moment: checkpoints are complete before their
``latest`` marker is written, the data order is a pure function of (seed, step), and
``metrics.jsonl`` drops lines past the checkpoint a resumed run starts from.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmembed.train import checkpoint
from llmembed.train.config import TrainConfig
from llmembed.train.evaluation import TrainingEvaluator
from llmembed.train.logging import RunLogger
from llmembed.train.remine import STATE_FILE
from llmembed.train.save import save_model, write_probe, write_summary
from llmembed.train.setup import TrainSetup, prepare
from llmembed.train.step import StepStats, optimizer_step


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    losses: list[float]
    skipped_records: int
    samples_per_s: float
    tokens_per_s: float


class _Throughput:
    """Cumulative counters since this process started training (rates cover all ranks)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.started = time.perf_counter()
        self.samples = self.tokens = self.real_tokens = 0

    def add(self, stats: StepStats) -> None:
        self.samples += stats.samples
        self.tokens += stats.padded_tokens
        self.real_tokens += stats.real_tokens

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def metrics(self) -> dict[str, float]:
        elapsed = self.elapsed()
        return {
            "samples_per_s": self.samples * self.world_size / elapsed,
            "tokens_per_s": self.tokens * self.world_size / elapsed,
            "padding_share": 1.0 - self.real_tokens / max(self.tokens, 1),
            "elapsed_s": elapsed,
        }


def train(config: TrainConfig, resume: str | None = None, skip_invalid: bool = False) -> TrainResult:
    """Run (or resume, with ``resume="auto"`` or a checkpoint tag) training."""
    run = prepare(config, resume, skip_invalid)
    losses, rates = _loop(run)
    return _finish(run, losses, rates)


def _loop(run: TrainSetup) -> tuple[list[float], dict[str, float]]:
    """Steps ``start_step + 1 .. total_steps``; returns their losses and the final rates."""
    config, rank, engine = run.config, run.rank, run.engine
    accum = config.train.gradient_accumulation_steps
    run_log = RunLogger(run.output_dir, config.logging, rank, run.total_steps, run.start_step, asdict(config))
    if rank == 0:
        (run.output_dir / checkpoint.CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
    batches = run.sampler.batches(run.start_step * accum)
    losses: list[float] = []
    meter = _Throughput(run.world_size)
    evaluator = TrainingEvaluator(config.evaluation, run.output_dir, rank)
    engine.train()
    for step in range(run.start_step + 1, run.total_steps + 1):
        lr = run.scheduler.get_last_lr()[0]  # the rate this step applies
        stats = optimizer_step(engine, batches, run.collator, run.losses, accum, config.loss.grad_cache_chunk)
        meter.add(stats)
        losses.append(stats.loss)
        masking = config.loss.false_negative_margin is not None or config.loss.guided_masking
        extra = {"masked_negatives": stats.masked_negatives} if masking else {}
        if run.refresher is not None:
            extra.update(_remine(run, step, stats, meter))
        if step % config.logging.log_every == 0 or step == run.total_steps or extra.get("remined"):
            # padding_share: since training started; step_padding_share: this step (this rank).
            run_log.log(step, {"loss": stats.loss, "accuracy": stats.accuracy, "lr": lr,
                               "grad_norm": stats.grad_norm,
                               "step_padding_share": 1.0 - stats.real_tokens / max(stats.padded_tokens, 1),
                               **extra, **meter.metrics()})
        if evaluator.due(step, run.total_steps):
            paused = time.perf_counter()
            evaluator.run(step, engine, run.model, run_log)
            meter.started += time.perf_counter() - paused  # rates count training time only
        if config.checkpoint.save_every and step % config.checkpoint.save_every == 0 and step < run.total_steps:
            files = {STATE_FILE: run.refresher.state()} if run.refresher is not None else None
            checkpoint.save(engine, run.checkpoint_root, step, rank, config.checkpoint.keep_last, files)
    run_log.close()
    return losses, meter.metrics()  # rates of training alone, before saving


def _remine(run: TrainSetup, step: int, stats: StepStats, meter: _Throughput) -> dict[str, float]:
    """Track the step's hard-negative scores and, when due, re-mine the stale records (every
    rank alike); returns what to log. Re-mining time is left out of the training rates."""
    refresher, every = run.refresher, run.config.remine.every
    refresher.observe(stats.negative_scores)
    remined = 0
    if step % every == 0 and step < run.total_steps:
        paused = time.perf_counter()
        remined = refresher.refresh(run.model, step)
        run.engine.train()
        meter.started += time.perf_counter() - paused
    return {"remined": remined, "remined_total": refresher.total}


def _finish(run: TrainSetup, losses: list[float], rates: dict[str, float]) -> TrainResult:
    final_dir = run.output_dir / "final"
    save_model(run.engine, run.model, final_dir, run.rank)
    if run.config.logging.probe_file:
        write_probe(run.model, Path(run.config.logging.probe_file), run.output_dir / "probe_embeddings.json",
                    run.rank)
    result = TrainResult(final_dir, run.total_steps, losses, run.read_report.skipped_total, rates["samples_per_s"],
                         rates["tokens_per_s"])
    write_summary(run.output_dir, {
        "steps": result.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "samples_per_s": round(result.samples_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "skipped_records": result.skipped_records,
        "final_model": str(final_dir),
    }, run.rank)
    return result

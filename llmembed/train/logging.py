"""Rank-0 progress bar, TensorBoard scalars, an optional W&B run, and a JSONL of step metrics
(the file resume tests and benchmarks read)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("llmembed.train")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a kill mid-write counts as past any step."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
    return step if isinstance(step, int) and not isinstance(step, bool) else float("inf")


def _keep_until(path: Path, step: int) -> None:
    """On resume, drop lines past the checkpoint (and a line torn by the kill) so no step is
    logged twice; replaced atomically, so a kill here cannot lose the earlier lines."""
    if not path.exists():
        return
    kept = [l for l in path.read_text(errors="replace").splitlines() if _step_of(l) <= step]
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(l + "\n" for l in kept))
    os.replace(partial, path)


class RunLogger:
    def __init__(self, output_dir: Path, config, rank: int, total_steps: int, start_step: int,
                 run_config: dict) -> None:
        self.rank = rank
        self.enabled = rank == 0
        self.metrics_path = output_dir / "metrics.jsonl"
        self.eval_path = output_dir / "eval.jsonl"
        self.writer = self.bar = self.wandb = None
        if not self.enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.metrics_path, self.eval_path):
            _keep_until(path, start_step)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if config.wandb:
            if importlib.util.find_spec("wandb") is None:
                logger.warning("logging.wandb is on but wandb is not installed; skipping W&B")
            else:
                import wandb

                self.wandb = wandb.init(project=config.wandb_project, config=run_config, resume="allow")
        if config.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}", lr=f"{metrics['lr']:.2e}")

    def log_eval(self, step: int, scores: dict[str, dict[str, float]], average: float) -> None:
        """Suite scores during training: ``eval.jsonl`` and TensorBoard ``eval/<task>/<metric>``."""
        if not self.enabled:
            return
        with open(self.eval_path, "a") as handle:
            handle.write(json.dumps({"step": step, "average": average, "scores": scores}) + "\n")
        flat = {f"eval/{task}/{key}": value for task, values in scores.items() for key, value in values.items()}
        flat["eval/average"] = average
        if self.writer is not None:
            for key, value in flat.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        line = (f"step {step}: eval average {average:.4f} "
                + " ".join(f"{t}={next(iter(v.values())):.4f}" for t, v in scores.items()))
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

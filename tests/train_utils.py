"""Helpers for trainer tests: synthetic data, config files, and launching real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .processes import kill_tree, run_group

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["apple", "river", "guitar", "planet", "doctor", "castle", "winter", "ocean", "train", "garden",
          "piano", "desert", "forest", "coffee", "robot", "bridge"]


def write_pairs(path: Path, n: int = 64, offset: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            t = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({
                "query": f"tell me about the {t} number {i}",
                "positive": f"This passage describes the {t} in detail, item {i}.",
                "negatives": [f"This passage is about a {TOPICS[(i + 3) % 16]} instead.",
                              f"Unrelated text on {TOPICS[(i + 5) % 16]}.",
                              f"Some words on {TOPICS[(i + 7) % 16]} and more."],
            }) + "\n")
    return path


def write_config(tmp: Path, model_dir: Path, data_files: list[Path], **sections) -> Path:
    config = {
        "model": {"backbone": {"name_or_path": str(model_dir), "dtype": "float32"},
                  "pooling": {"kind": "last_token"}, "lora": {"r": 4, "dropout": 0.0}},
        "data": {"datasets": [{"path": str(p)} for p in data_files], "group_size": 2,
                 "query_max_length": 32, "passage_max_length": 32},
        "train": {"lr": 1e-3, "per_device_batch_size": 4, "max_steps": 6, "seed": 3, "deepspeed": "zero2"},
        "checkpoint": {"output_dir": str(tmp / "run"), "save_every": 0, "keep_last": 2},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        for key, value in values.items():
            target = config.setdefault(section, {})
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key].update(value)
            else:
                target[key] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(config: Path, procs: int, launcher: str, extra: list[str] | None) -> list[str]:
    python = sys.executable
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *(extra or [])]
    port = str(free_port())
    if procs == 1 and launcher == "python":
        return [python, *script]
    if launcher == "deepspeed":
        return [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port", port, *script]
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", port, *script]


def _env(env: dict | None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            **(env or {})}


def launch(config: Path, procs: int = 1, launcher: str = "torchrun", extra: list[str] | None = None,
           env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py in ``procs`` real processes (stdout and stderr together); on timeout
    or exit the launcher and every rank are killed by PID (see :func:`kill_tree`)."""
    return run_group(_command(config, procs, launcher, extra), _env(env), config.parent, timeout, "training", check)


def start(config: Path, log, procs: int = 1, launcher: str = "torchrun",
          extra: list[str] | None = None) -> subprocess.Popen:
    """Start a training run in its own session, output to ``log``; the caller stops it
    (:func:`kill_tree`)."""
    return subprocess.Popen(_command(config, procs, launcher, extra), cwd=config.parent, env=_env(None),
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def launch_and_kill(config: Path, until: Callable[[], bool], procs: int = 1, launcher: str = "torchrun",
                    extra: list[str] | None = None, timeout: float = 600, poll_s: float = 0.02) -> str:
    """Start a training run in its own session and SIGKILL all of it (launcher and every rank,
    as an OOM killer or a preempted node would) as soon as ``until()`` holds. Returns the
    run's output. Fails if the run ends, or times out, before it could be killed."""
    with tempfile.TemporaryFile("w+") as log:
        proc = start(config, log, procs, launcher, extra)
        deadline = time.monotonic() + timeout
        try:
            while not until():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"training ended ({proc.returncode}) or timed out before the kill:\n"
                                         f"{log.read()[-5000:]}")
                time.sleep(poll_s)
        finally:
            kill_tree(proc)
        log.seek(0)
        return log.read()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far, read while a run may be writing it (a torn last line is
    not a step yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            break
    return steps

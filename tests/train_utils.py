"""Helpers for trainer tests: synthetic data, config files, and launching real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from .processes import run_group

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


def write_config(tmp: Path, model_dir: Path, data: list[Path], **sections) -> Path:
    config = {
        "model": {"backbone": {"name_or_path": str(model_dir), "dtype": "float32"},
                  "pooling": {"kind": "last_token"}, "lora": {"r": 4, "dropout": 0.0},
                  "query_max_length": 32, "passage_max_length": 32},
        "data": {"datasets": [{"path": str(p)} for p in data], "group_size": 2},
        "train": {"lr": 1e-3, "per_device_batch_size": 4, "max_steps": 6, "seed": 3, "deepspeed": "zero2"},
        "checkpoint": {"output_dir": str(tmp / "run"), "save_every": 0, "keep_last": 2},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config[section].get(key), dict):
                config[section][key].update(value)
            else:
                config.setdefault(section, {})[key] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, procs: int = 1, launcher: str = "torchrun", extra: list[str] | None = None,
           env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py in ``procs`` real processes; the whole process group is killed by
    PID on timeout or exit."""
    python = sys.executable
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *(extra or [])]
    port = str(free_port())
    if procs == 1 and launcher == "python":
        cmd = [python, *script]
    elif launcher == "deepspeed":
        cmd = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port", port, *script]
    else:
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", port, *script]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return run_group(cmd, full_env, config.parent, timeout, "training", check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]

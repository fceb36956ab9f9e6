"""Checkpoints that resume the same run: DeepSpeed engine state (weights, optimizer, LR
scheduler) plus the step counter and each rank's RNG states. The data order needs nothing
more: the sampler is a pure function of (seed, step)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

TAG_PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, rank: int, keep_last: int) -> Path:
    """Save a checkpoint that is either complete or invisible to resume, wherever a kill lands.

    RNG states first, then DeepSpeed's files, then the ``latest`` marker. DeepSpeed's own
    marker is switched off: rank 0 writes it as soon as rank 0's files are done, while other
    ranks may still be writing their optimizer shards. Ours is written after the barrier that
    ends ``save_checkpoint`` (every rank done), atomically (rename), in DeepSpeed's format so
    its ``zero_to_fp32`` tool still finds the tag.
    """
    import torch.distributed as dist

    tag = f"{TAG_PREFIX}{step}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), root / tag / f"rng_state_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    if rank == 0:
        partial = root / "latest.tmp"
        partial.write_text(tag)
        os.replace(partial, root / "latest")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and keep_last > 0:
        tags = sorted((p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir()), key=lambda p: int(p.name[len(TAG_PREFIX):]))
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return root / tag


def latest_tag(root: Path) -> str | None:
    marker = root / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (root / tag).is_dir() else None


def load(engine, root: Path, tag: str, rank: int) -> int:
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
    rng_file = root / tag / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client_state["step"])

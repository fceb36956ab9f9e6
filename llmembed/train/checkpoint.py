"""Checkpoints that resume the same run: DeepSpeed engine state (weights, optimizer, LR
scheduler) plus the step counter and each rank's RNG states. The data order needs nothing
more: the sampler is a pure function of (seed, step)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TAG_PREFIX = "step-"
logger = logging.getLogger("llmembed.train")


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every RNG the run draws from, as JSON-able numbers plus tensors: no pickle, so a crafted
    checkpoint cannot run code when it is resumed."""
    version, python_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numbers = {"python": [version, list(python_state), gauss],
               "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return numbers, tensors


def set_rng_state(numbers: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, python_state, gauss = numbers["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, pos, has_gauss, cached = numbers["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_state_rank{rank}.json", folder / f"rng_state_rank{rank}.safetensors"


def save(engine, root: Path, step: int, rank: int, keep_last: int, files: dict[str, str] | None = None) -> Path:
    """Save a checkpoint that is either complete or invisible to resume, wherever a kill lands.

    RNG states first, then DeepSpeed's files, then the ``latest`` marker. DeepSpeed's own
    marker is switched off: rank 0 writes it as soon as rank 0's files are done, while other
    ranks may still be writing their optimizer shards. Ours is written after the barrier that
    ends ``save_checkpoint`` (every rank done), atomically (rename), in DeepSpeed's format so
    its ``zero_to_fp32`` tool still finds the tag. ``files`` (name -> text, the same on every
    rank) is run state besides the engine's, written by rank 0 into the tag's folder.
    """
    import torch.distributed as dist

    tag = f"{TAG_PREFIX}{step}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    numbers, tensors = rng_state()
    numbers_file, tensors_file = _rng_files(root / tag, rank)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensors_file))
    numbers_file.write_text(json.dumps(numbers))
    if rank == 0:
        for name, text in (files or {}).items():
            (root / tag / name).write_text(text)
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
    return tag if tag and (root / tag).is_dir() else None


def _step(tag: str) -> int | None:
    number = tag[len(TAG_PREFIX):]
    return int(number) if tag.startswith(TAG_PREFIX) and number.isdigit() else None


def resume_candidates(root: Path) -> list[str]:
    """Checkpoints to try for ``--resume auto``, best first: the one ``latest`` names, then older
    ones, newest first. Checkpoints newer than ``latest`` are left out: a kill stopped them
    before they were complete. Without a readable ``latest`` every checkpoint is a candidate
    (a failed load falls through to the next)."""
    tags = sorted((p.name for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and _step(p.name) is not None),
                  key=_step, reverse=True)
    latest = latest_tag(root)
    if latest is None or _step(latest) is None:
        return tags
    return [latest] + [t for t in tags if _step(t) < _step(latest)]


def load(engine, root: Path, tag: str, rank: int) -> int:
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
    numbers_file, tensors_file = _rng_files(root / tag, rank)
    if numbers_file.is_file() and tensors_file.is_file():
        set_rng_state(json.loads(numbers_file.read_text()), load_file(str(tensors_file)))
    else:
        logger.warning("%s has no RNG state for rank %d: dropout after the resume will differ", root / tag, rank)
    return int(client_state["step"])


CONFIG_FILE = "train_config.json"  # the run's full config, beside its checkpoints
# Sections that change where and how often a run writes, not what it computes.
_RESUMABLE_CHANGES = ("checkpoint", "logging", "evaluation")
# The run's length: stopping a run early or extending it is a resume (the LR schedule then
# follows the new length from the resumed step on).
_RESUMABLE_KEYS = ("train.max_steps", "train.epochs")


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs between two configs (nested dicts as
    dotted keys), leaving out the sections a resumed run may change."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if (not prefix and key in _RESUMABLE_CHANGES) or name in _RESUMABLE_KEYS:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{name}.")
        elif old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def check_same_run(output_dir: Path, current: dict) -> None:
    """Refuse to resume a run's checkpoints under a config that trains differently: the
    checkpoints' optimizer, schedule and data order belong to the saved config, and a silent
    mix of the two would be neither run."""
    saved_file = output_dir / CONFIG_FILE
    if not saved_file.is_file():
        return
    changes = config_changes(json.loads(saved_file.read_text()), json.loads(json.dumps(current)))
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise ValueError(f"--resume: {output_dir} holds a run trained with another config ({'; '.join(changes[:3])}"
                         f"{more}); resume it with its own config ({saved_file}), or train into another "
                         "checkpoint.output_dir")

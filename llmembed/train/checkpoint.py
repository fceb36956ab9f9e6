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

from llmembed.train.safe_load import weights_only_torch_load
from llmembed.train.universal import UNIVERSAL_DIR, universal_copy

TAG_PREFIX = "step-"
# The world size and per-process batch a checkpoint was saved with: a resume on another world
# size keeps the global batch (and so the data order) and loads the universal form.
SHAPE_FILE = "run_shape.json"
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
        shape = {"world_size": _world_size(), "per_device_batch_size": engine.train_micro_batch_size_per_gpu()}
        for name, text in {SHAPE_FILE: json.dumps(shape), **(files or {})}.items():
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
            shutil.rmtree(root / UNIVERSAL_DIR / old.name, ignore_errors=True)
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


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def saved_shape(folder: Path) -> dict | None:
    """The world size and per-process batch a checkpoint was saved with (None: saved before
    checkpoints recorded it)."""
    path = folder / SHAPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_shape(root: Path, tag: str, per_device_batch_size: int, world_size: int, saved_config: dict | None) -> None:
    """Refuse, in one line and before anything loads, a resume whose global batch differs from
    the checkpoint's: its data order (a function of the step and the global batch) would not
    continue the run's."""
    shape = saved_shape(root / tag)
    if shape is None:  # an older checkpoint: its config holds the per-process batch, not the world size
        saved = ((saved_config or {}).get("train") or {}).get("per_device_batch_size", per_device_batch_size)
        if saved != per_device_batch_size:
            raise ValueError(f"--resume: {root / tag} does not record its world size; resume it with its "
                             f"train.per_device_batch_size ({saved})")
        return
    saved_global = shape["world_size"] * shape["per_device_batch_size"]
    if saved_global != world_size * per_device_batch_size:
        fit = (f"set train.per_device_batch_size={saved_global // world_size}" if saved_global % world_size == 0
               else f"use a world size that divides {saved_global}")
        raise ValueError(f"--resume: {root / tag} was saved by {shape['world_size']} process(es) x batch "
                         f"{shape['per_device_batch_size']} (global batch {saved_global}); this run has "
                         f"{world_size} x {per_device_batch_size}: {fit}, so the run sees the same batches")


def load(engine, root: Path, tag: str, rank: int) -> int:
    """Load a checkpoint into ``engine``; one saved on another world size loads through its
    universal form (:mod:`llmembed.train.universal`, converted once by rank 0)."""
    shape = saved_shape(root / tag)
    if shape is not None and shape["world_size"] != _world_size():
        if rank == 0:
            print(f"{root / tag} was saved by {shape['world_size']} process(es); loading it on {_world_size()} "
                  "through DeepSpeed's universal checkpoint")
        client_state = _load_universal(engine, root, tag, rank)
    else:
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


def _load_universal(engine, root: Path, tag: str, rank: int) -> dict | None:
    import torch.distributed as dist

    problem = ""
    if rank == 0:
        try:
            universal_copy(root, tag)
        except Exception as err:  # every rank must learn it, or the others wait forever
            problem = str(err)
    ok = torch.tensor([0 if problem else 1])
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise RuntimeError(problem or f"{root / tag}: rank 0 could not convert it to a universal checkpoint")
    # DeepSpeed reads the universal form when its config says so; the flag is set for this
    # load only, so later checkpoints are saved (and read) in the usual form.
    engine._config.load_universal_checkpoint = True
    try:
        with weights_only_torch_load():
            _, client_state = engine.load_checkpoint(str(root / UNIVERSAL_DIR), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    return client_state


CONFIG_FILE = "train_config.json"  # the run's full config, beside its checkpoints
# Sections that change where and how often a run writes, not what it computes.
_RESUMABLE_CHANGES = ("checkpoint", "logging", "evaluation")
# The run's length: stopping a run early or extending it is a resume (the LR schedule then
# follows the new length from the resumed step on). The per-process batch changes with the
# world size; the global batch must not (check_shape). Where the parsed data is cached changes
# nothing it holds.
_RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.per_device_batch_size", "data.cache_dir")


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


def saved_config(output_dir: Path) -> dict | None:
    saved_file = output_dir / CONFIG_FILE
    return json.loads(saved_file.read_text()) if saved_file.is_file() else None


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

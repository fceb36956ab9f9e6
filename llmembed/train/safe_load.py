"""Read DeepSpeed checkpoints with ``torch.load(weights_only=True)``: a crafted checkpoint
cannot run code on ``--resume``.

DeepSpeed's default checkpoint engine unpickles everything (``weights_only=False``). Its files
hold tensors, containers and numbers, plus a few DeepSpeed classes that are plain data
holders; those are allowed by name and rebuilt without running their code, and any other
class in a file is refused (the resume then falls back to an older checkpoint, or stops).
The list was taken from real ZeRO-2 and ZeRO-3 checkpoints (fp32 and bf16) with
``torch.serialization.get_unsafe_globals_in_checkpoint``.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


class UnsafeCheckpoint(ValueError):
    """A checkpoint file names a class outside the allowed list."""


def allowed_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaler, LossScaleProfile
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, LossScaleConfig, LossScaleProfile, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading without arbitrary unpickling."""

    def load(self, path: str, map_location: Any = None) -> Any:
        allowed = allowed_classes()
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError:
                pass
        # Name what was refused (torch's own message suggests loading the file unsafely).
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a torn file: no list of names to give
            names = set()
        names -= {f"{c.__module__}.{c.__qualname__}" for c in allowed}
        raise UnsafeCheckpoint(f"{path} holds {', '.join(sorted(names)) or 'objects'} besides tensors; refused "
                               "unread: unpickling it could run code")


def use_weights_only_loading(engine: Any) -> None:
    """Give ``engine`` (from ``deepspeed.initialize``) the weights-only engine, keeping its
    save format. DeepSpeed has no option for this; its other engines (the fast and decoupled
    writers) already load with torch's default, ``weights_only=True``."""
    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        safe = WeightsOnlyCheckpointEngine(None)
        safe.zipfile_serialization = current.zipfile_serialization
        engine.checkpoint_engine = safe


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every ``torch.load`` reads weights only (the allowed classes above),
    whatever its caller asked: for DeepSpeed code that calls ``torch.load(weights_only=False)``
    itself (its universal-checkpoint conversion and loading) instead of through the engine."""
    original = torch.load

    def safe(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed_classes()):
            return original(*args, **kwargs)

    torch.load = safe
    try:
        yield
    finally:
        torch.load = original

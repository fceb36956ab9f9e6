"""Fill a DeepSpeed JSON's "auto" values from the run config.

``train.deepspeed`` names a preset (the JSONs of the top-level ``ds_configs/`` folder, installed
as the package ``llmembed.ds_configs``) or a path to the user's own JSON. Presets are read as
package resources, so an installed llmembed (wheel, ``pip install .``) needs no checkout.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from llmembed.train.config import TrainConfig

PRESETS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
PRESET_PACKAGE = "llmembed.ds_configs"


def read_preset_text(name: str) -> tuple[str, str]:
    """The JSON text of ``train.deepspeed`` (a preset name or a file path) and where it came from."""
    if name in PRESETS:
        return files(PRESET_PACKAGE).joinpath(PRESETS[name]).read_text(), f"preset {name}"
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: {name!r} is neither a preset {sorted(PRESETS)} nor a JSON file")
    return path.read_text(), str(path)


def build_ds_config(config: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    text, where = read_preset_text(config.train.deepspeed)
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: {err}") from None
    opt = config.train
    fills = {
        "train_micro_batch_size_per_gpu": opt.per_device_batch_size,
        "gradient_accumulation_steps": opt.gradient_accumulation_steps,
        "train_batch_size": opt.per_device_batch_size * opt.gradient_accumulation_steps * world_size,
        "gradient_clipping": opt.max_grad_norm,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if config.loss.grad_cache_chunk is not None:
        # GradCache back-propagates each chunk separately: every backward accumulates and our
        # one engine.step() per optimizer step is the boundary (DeepSpeed's caller-owned mode).
        ds["managed_gradient_accumulation"] = False
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        if section in ds and ds[section].get("enabled") == "auto":
            ds[section]["enabled"] = enabled
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", opt.lr), ("weight_decay", opt.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    zero = ds.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def wants_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

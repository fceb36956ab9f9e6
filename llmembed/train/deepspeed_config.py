"""Fill a DeepSpeed JSON's "auto" values from the run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmembed.train.config import TrainConfig

PRESETS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def _preset_path(name: str) -> Path:
    if name in PRESETS:
        return DS_CONFIG_DIR / PRESETS[name]
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: {name!r} is neither a preset {sorted(PRESETS)} nor a JSON file")
    return path


def build_ds_config(config: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    path = _preset_path(config.train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
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

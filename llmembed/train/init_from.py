"""Start a run from a trained model folder's weights (``train.init_from``).

Multi-stage recipes (GTE, piccolo, stella: weak pairs with in-batch negatives, then labelled
triples with hard negatives; NV-Embed-v2's instruction-tuning stage) continue the previous
stage's model with new data, loss and schedule. The model is built from the stage's own config
as usual (LoRA, gradient checkpointing, quantization all apply), then the folder's trained
weights are copied in: the LoRA adapter or the full backbone, and the pooling head. The
optimizer and LR schedule start fresh, as a new stage should. The folder must serve the same
way (serving contract) and hold the same kind of weights (same LoRA shape, or full).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmembed.lora import is_peft_model
from llmembed.model import CONFIG_FILE, EmbeddingModel
from llmembed.serving import ServingContract


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def load_start_weights(model: EmbeddingModel, folder: str | Path) -> None:
    """Copy ``folder``'s trained weights into the freshly built ``model`` (see the module docstring)."""
    folder = Path(folder)
    where = f"train.init_from {folder}"
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{where}: not a trained model folder (no {CONFIG_FILE})")
    contract = ServingContract.load(folder)
    if contract != model.contract:
        fields = [f for f in vars(contract) if getattr(contract, f) != getattr(model.contract, f)]
        raise ValueError(f"{where}: serves differently from this run's model ({', '.join(fields)}); "
                         "keep the model section of every stage the same")
    adapter = folder / "adapter"
    if adapter.is_dir() != is_peft_model(model.backbone):
        raise ValueError(f"{where}: holds {'a LoRA adapter' if adapter.is_dir() else 'a full backbone'}, "
                         f"this run trains {'LoRA' if is_peft_model(model.backbone) else 'the full backbone'}")
    if adapter.is_dir():
        from peft import set_peft_model_state_dict

        saved = json.loads((adapter / "adapter_config.json").read_text())
        ours = model.backbone.peft_config["default"]
        if (saved.get("r"), saved.get("lora_alpha")) != (ours.r, ours.lora_alpha):
            raise ValueError(f"{where}: LoRA r={saved.get('r')}, alpha={saved.get('lora_alpha')}; this run has "
                             f"r={ours.r}, alpha={ours.lora_alpha}")
        result = set_peft_model_state_dict(model.backbone, _safetensors(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{where}: adapter weights that fit no layer of this model ({unexpected[0]}, ...)")
    else:
        missing, unexpected = model.backbone.load_state_dict(_safetensors(folder / "backbone"), strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise ValueError(f"{where}: backbone weights do not match this model "
                             f"({(unexpected or missing)[0]}, ...)")
    model.pooling.load_weights(folder / "pooling")

"""LoRA / QLoRA through peft.

Defaults follow E5-mistral and NV-Embed practice: rank 16, alpha 32, dropout 0.1, on every
linear projection of the transformer blocks (peft's ``all-linear``). For QLoRA the backbone is
loaded 4-bit by :mod:`llmembed.backbone` and the adapters stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmembed.config import bounded, check_ranges


@dataclass
class LoraSettings:
    r: int = bounded(16, ge=1)
    alpha: int = bounded(32, ge=1)
    dropout: float = bounded(0.1, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    # Modules (besides the adapters) to train and save, e.g. ["embed_tokens"] after adding tokens.
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save or None,
            bias="none",
        )


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights stay trainable."""
    from peft import get_peft_model

    return get_peft_model(model, settings.to_peft())


def load_lora(model: torch.nn.Module, adapter_dir: str, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)

"""Load any Hugging Face decoder as an embedding backbone.

The backbone is the bare transformer (``AutoModel``: no LM head), loaded with a chosen dtype
and attention implementation, optionally quantised by bitsandbytes. Bidirectional attention
uses transformers' own switch, ``config.is_causal = False``, which transformers 5 honours in
the eager, sdpa and flash-attention paths of Mistral, Qwen2/3, Llama and Gemma2, and which is
written to ``config.json`` so exports and vLLM see it too. We deliberately do not patch
attention modules (the llm2vec recipe): in transformers 5 that leaves eager causal and makes
sdpa causal again as soon as a batch is padded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from llmembed.config import bounded, check_ranges
from llmembed.resolve import ModelPathError, missing_tokenizer_files, resolve_model_path

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
QUANTIZATIONS = (None, "4bit", "8bit")


class BackboneError(ValueError):
    """A backbone setting or path is wrong; the message says which."""


# What loading raises for a weight file cut short or corrupted (a full disk, a broken copy).
DAMAGED_WEIGHTS = (SafetensorError, EOFError)


def damaged_weights_message(folder: object, err: BaseException) -> str:
    """One line for a folder whose weights fail to load with one of :data:`DAMAGED_WEIGHTS`."""
    text = str(err).strip()
    return f"{folder}: damaged weight file ({type(err).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'})"

@dataclass
class BackboneConfig:
    """How to build the backbone.

    ``name_or_path``: ``"default"`` (the packaged SmolLM2-135M-Instruct), a local folder, or a
    hub id (only when a hub is reachable). ``dtype``: ``auto`` picks bf16 on a CUDA device that
    supports it and fp32 elsewhere. ``attn_implementation``: ``auto`` picks flash-attention 2
    when it is installed and CUDA is available, else sdpa.
    """

    name_or_path: str = "default"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    bidirectional: bool = False
    quantization: str | None = None
    trust_remote_code: bool = False
    # Dropout on attention probabilities while training (the config's attention_dropout, which
    # Llama, Mistral, Qwen2/3 and Gemma2 read); a source of SimCSE's views for full fine-tuning.
    # None keeps the checkpoint's value (0 for these families). Inactive in eval and serving.
    attention_dropout: float | None = bounded(None, ge=0.0, lt=1.0)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise BackboneError(f"backbone.dtype: {self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise BackboneError(
                f"backbone.attn_implementation: {self.attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise BackboneError(f"backbone.quantization: {self.quantization!r} is not one of {QUANTIZATIONS}")
        try:
            check_ranges(self)
        except ValueError as err:
            raise BackboneError(f"backbone.{err}") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def resolve_attn_implementation(name: str) -> str:
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if flash_installed and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not (flash_installed and torch.cuda.is_available()):
        raise BackboneError(
            "backbone.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn --no-build-isolation); use 'sdpa' or 'auto' on this machine."
        )
    return name


def resolve_backbone_path(name_or_path: str) -> str:
    """``llmembed.resolve.resolve_model_path`` (shared with synth), with its error reported as
    a backbone setting."""
    try:
        return resolve_model_path(name_or_path)
    except ModelPathError as err:
        raise BackboneError(f"backbone.name_or_path: {err}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    missing = missing_tokenizer_files(Path(path)) if Path(path).is_dir() else []
    if missing:  # transformers would look for the rest on the hub
        raise BackboneError(f"{path}: incomplete model folder (half copied?), missing {', '.join(missing)}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise BackboneError(f"The tokenizer at {path} has no EOS token; last-token pooling needs one.")
    if tokenizer.pad_token_id is None:
        # Pads are masked everywhere, so reusing EOS as the pad id is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(kind: str | None, compute_dtype: torch.dtype):
    if kind is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackboneError(
            f"backbone.quantization={kind!r} needs bitsandbytes: pip install 'llmembed[qlora]' (or bitsandbytes>=0.50)"
        )
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers from repacking their weights for avx512-bf16 CPUs.

    After one no-grad forward, ``Linear4bit`` repacks its weights on such CPUs and the
    backward pass then silently drops gradients. Training code must call this. Returns the
    number of layers touched.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def set_bidirectional(model: torch.nn.Module, bidirectional: bool) -> None:
    """Switch attention between causal and bidirectional via ``config.is_causal``."""
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    for config in configs:
        config.is_causal = not bidirectional


def is_bidirectional(model: torch.nn.Module) -> bool:
    return getattr(model.config, "is_causal", True) is False


class _DropLmHeadReport(logging.Filter):
    """Hide transformers' load report when its only finding is the unused LM head: loading a
    causal-LM checkpoint as the bare transformer always drops ``lm_head.*``. Any other finding
    (missing or mismatched keys) is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message or "MISSING" in message or "MISMATCH" in message:
            return True
        rows = [line for line in message.splitlines() if "UNEXPECTED" in line and "|" in line]
        return not rows or not all(line.strip().startswith("lm_head") for line in rows)


def load_backbone(config: BackboneConfig, path: str | None = None, **extra: Any) -> torch.nn.Module:
    """Load the bare transformer described by ``config`` (from ``path`` when already resolved)."""
    from transformers import AutoModel

    path = path or resolve_backbone_path(config.name_or_path)
    dtype = resolve_dtype(config.dtype)
    attn = resolve_attn_implementation(config.attn_implementation)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=config.trust_remote_code)
    quant = _quantization_config(config.quantization, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if config.attention_dropout is not None:
        kwargs["attention_dropout"] = config.attention_dropout
    kwargs.update(extra)
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLmHeadReport()
    report_logger.addFilter(report_filter)
    try:
        model = AutoModel.from_pretrained(path, **kwargs)
    except ValueError as err:
        if attn == "sdpa" and config.attn_implementation == "auto" and "sdpa" in str(err).lower():
            logger.warning("%s does not support sdpa attention; falling back to eager.", path)
            kwargs["attn_implementation"] = "eager"
            model = AutoModel.from_pretrained(path, **kwargs)
        else:
            raise
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only local folders and 'default' work)" if offline else ""
        raise BackboneError(f"Cannot load backbone {config.name_or_path!r} from {path}{hint}: {err}") from err
    finally:
        report_logger.removeFilter(report_filter)
    set_bidirectional(model, config.bidirectional)
    if quant is not None:
        disable_cpu_bf16_repack(model)
    return model

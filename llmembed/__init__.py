"""llmembed: turn a decoder-only LLM into a text-embedding model."""

from llmembed.backbone import BackboneConfig
from llmembed.lora import LoraSettings
from llmembed.model import EmbeddingModel, EmbeddingModelConfig
from llmembed.pooling import PoolingConfig
from llmembed.prompts import PromptConfig

__all__ = [
    "BackboneConfig",
    "EmbeddingModel",
    "EmbeddingModelConfig",
    "LoraSettings",
    "PoolingConfig",
    "PromptConfig",
]
__version__ = "0.1.0"

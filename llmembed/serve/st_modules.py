"""sentence-transformers modules for heads that ST does not ship.

Last-token and mean pooling export to ST's own ``Pooling``; only the NV-Embed
latent-attention head needs this adapter. It wraps :class:`llmembed.pooling.LatentAttentionPooling`
so ST runs exactly our code. sentence-transformers 6 imports classes outside its own package only with
``trust_remote_code=True`` (for a local folder it then imports this installed module; no code
is shipped in the export); the exported model card says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Module
from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

from llmembed.pooling import LatentAttentionPooling as _LatentHead
from llmembed.pooling import Pooling, PoolingConfig
from llmembed.remote_code import check_no_remote_code
from llmembed.st_layout import LATENT_MODULE_TYPE


class LatentAttentionPooling(Module):
    config_keys = ["embedding_dimension", "num_latents", "num_heads", "mlp_ratio", "include_prompt"]

    def __init__(
        self,
        embedding_dimension: int,
        num_latents: int = 512,
        num_heads: int = 8,
        mlp_ratio: int = 4,
        include_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.num_latents = num_latents
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.include_prompt = include_prompt
        config = PoolingConfig(
            kind=_LatentHead.kind,
            include_instruction=include_prompt,
            num_latents=num_latents,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.head = _LatentHead(config, embedding_dimension)

    @classmethod
    def from_head(cls, head: _LatentHead) -> "LatentAttentionPooling":
        module = cls(
            head.hidden_size,
            head.config.num_latents,
            head.config.num_heads,
            head.config.mlp_ratio,
            head.config.include_instruction,
        )
        module.head.load_state_dict(head.state_dict())
        return module

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        tokens = features["token_embeddings"]
        prompt_lengths = None
        if "prompt_length" in features and not self.include_prompt:
            value = features["prompt_length"]
            value = int(value.reshape(-1)[0].item()) if isinstance(value, torch.Tensor) else int(value)
            prompt_lengths = torch.full((tokens.shape[0],), value, dtype=torch.long, device=tokens.device)
        embedding = self.head(tokens, features["attention_mask"], prompt_lengths)
        features["sentence_embedding"] = embedding.to(tokens.dtype)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "LatentAttentionPooling":
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**config)
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub)
        return module


# Our sentence-transformers module for each pooling that ST has no Pooling mode for
# (``Pooling.st_pooling_mode`` is None), by pooling kind.
OWN_MODULES: dict[str, type[Module]] = {_LatentHead.kind: LatentAttentionPooling}


def st_pooling_module(head: Pooling) -> Module:
    """The sentence-transformers module that computes what ``head`` computes: ST's own
    ``Pooling`` where it has the mode, else our module carrying the head's weights."""
    if head.st_pooling_mode is not None:
        return STPooling(head.hidden_size, pooling_mode=head.st_pooling_mode,
                         include_prompt=head.config.include_instruction)
    if head.config.kind not in OWN_MODULES:
        raise ValueError(f"{head.config.kind} pooling has neither a sentence-transformers Pooling mode nor a "
                         "module in llmembed.serve.st_modules.OWN_MODULES")
    return OWN_MODULES[head.config.kind].from_head(head)


def load_sentence_transformer(folder: str | Path, trust_remote_code: bool = False, **kwargs: Any):
    """``SentenceTransformer(folder)`` after the folder passed the remote-code check. Our own
    module classes (the latent-attention head) are handed over as classes, so loading them
    needs no ``trust_remote_code`` (which would also let the folder's configs run code)."""
    check_no_remote_code(folder, trust_remote_code)
    kwargs = dict(device="cpu", local_files_only=True, **kwargs)
    if not trust_remote_code and hasattr(SentenceTransformer, "_load_with_module_classes"):
        return SentenceTransformer._load_with_module_classes(str(folder), {LATENT_MODULE_TYPE: LatentAttentionPooling},
                                                             **kwargs)
    return SentenceTransformer(str(folder), trust_remote_code=trust_remote_code, **kwargs)

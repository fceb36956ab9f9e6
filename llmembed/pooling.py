"""Pooling: token states -> one vector per text.

Each pooling is a module built from a :class:`PoolingConfig` (part of the serving contract,
saved in ``llmembed_serving.json``) and saving only its weights (``model.safetensors``).

- ``last_token``: the state of the last real token. Our tokenization appends EOS, so this is
  the EOS state (E5-mistral, gte-Qwen2). Works under left and right padding.
- ``mean``: mean over real tokens; pads never count.
- ``latent_attention``: NV-Embed (Lee et al., 2024, "NV-Embed: Improved Techniques for
  Training LLMs as Generalist Embedding Models", arXiv 2405.17428): token states attend to a
  trainable latent array, pass an MLP, then are mean-pooled.

Mean and latent pooling can leave the instruction prefix out (``include_instruction=False``):
its tokens still shape the others through attention, but are not averaged. The prompt's length
is counted as sentence-transformers counts it (the prefix tokenised alone), so exports agree
with training; with byte-level BPE a prefix ending in a space ("Query: ") counts the space as
a token of its own, and the first text token (" hello") is then left out as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmembed.config import bounded, check_ranges

WEIGHTS_NAME = "model.safetensors"


@dataclass
class PoolingConfig:
    kind: str = "last_token"
    include_instruction: bool = True
    # latent_attention only (NV-Embed used 512 latents and 8 heads on a 4096-wide Mistral).
    num_latents: int = bounded(512, ge=1)
    num_heads: int = bounded(8, ge=1)
    mlp_ratio: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        if self.kind not in POOLINGS:
            raise ValueError(f"pooling.kind: {self.kind!r} is not one of {tuple(POOLINGS)}")
        if not POOLINGS[self.kind].can_skip_instruction and not self.include_instruction:
            raise ValueError(f"pooling.include_instruction=false has no meaning for {self.kind} pooling")
        check_ranges(self)


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).amax(dim=1)


def content_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None) -> torch.Tensor:
    """``attention_mask`` with each row's first ``prompt_lengths`` real tokens switched off.

    Exactly sentence-transformers' rule, degenerate case included: when the prompt count covers
    the whole text (a one-token query after a prompt ending in a space, which BPE merges into
    that token), nothing is left and the pooled vector is zero, as ST's ``Pooling`` returns.
    Keeping a token instead would give a vector that no exported model reproduces.
    """
    mask = attention_mask.bool()
    if prompt_lengths is None:
        return mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    first_real = (mask.int().argmax(dim=1)).unsqueeze(1)
    return mask & (positions.unsqueeze(0) >= first_real + prompt_lengths.to(mask.device).unsqueeze(1))


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Pooling(nn.Module):
    """Base class: ``forward(hidden, attention_mask, prompt_lengths=None) -> (batch, dim)``.

    Each pooling also states, once, how it is served: the serving contract, the exporter and
    verify read these class attributes instead of switching on ``kind``. A new pooling is its
    class here plus its entry in ``POOLINGS`` (and, when sentence-transformers has no module for
    it, one in :mod:`llmembed.serve.st_modules`)."""

    kind: ClassVar[str]
    # The vector is the last real token's state: the tokenizer appends EOS by default and pads
    # on the left (the decoder convention).
    reads_last_token: ClassVar[bool] = False
    # Whether it can leave the instruction's tokens out (pooling.include_instruction: false).
    can_skip_instruction: ClassVar[bool] = True
    # sentence-transformers' Pooling mode that renders it; None: it ships an ST module of ours.
    st_pooling_mode: ClassVar[str | None] = None
    # Whether a user can pool a plain transformers forward by hand (what verify's transformers
    # path does); a head with weights of its own cannot.
    by_hand: ClassVar[bool] = True

    @classmethod
    def vllm_unsupported(cls, config: PoolingConfig) -> str | None:
        """Why vLLM cannot serve this pooling with these settings, or None when it can."""
        return None

    @classmethod
    def pool_by_hand(cls, hidden: torch.Tensor, skip: int) -> torch.Tensor:
        """One text's vector from a plain forward's states (tokens x hidden), its first ``skip``
        (prompt) tokens left out when the pooling leaves the instruction out."""
        raise NotImplementedError(f"{cls.kind} pooling has no by-hand rule")

    def __init__(self, config: PoolingConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size

    @property
    def output_dim(self) -> int:
        return self.hidden_size

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None):
        raise NotImplementedError

    def _prompt_lengths(self, prompt_lengths: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.config.include_instruction else prompt_lengths

    def save_weights(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``model.safetensors`` (``state`` overrides the live weights); heads without
        weights write nothing."""
        state = self.state_dict() if state is None else state
        if state:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_NAME))

    def load_weights(self, folder: str | Path, prefix: str = "") -> None:
        """Read ``model.safetensors`` (keys under ``prefix``); a head with weights needs the file."""
        path = Path(folder) / WEIGHTS_NAME
        if not self.state_dict():
            return
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the {self.config.kind} head's weights are missing")
        state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
        self.load_state_dict(state)


class LastTokenPooling(Pooling):
    kind = "last_token"
    reads_last_token = True
    can_skip_instruction = False
    st_pooling_mode = "lasttoken"

    @classmethod
    def pool_by_hand(cls, hidden: torch.Tensor, skip: int) -> torch.Tensor:
        return hidden[-1]

    def forward(self, hidden, attention_mask, prompt_lengths=None):
        index = last_token_indices(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class MeanPooling(Pooling):
    kind = "mean"
    st_pooling_mode = "mean"

    @classmethod
    def vllm_unsupported(cls, config: PoolingConfig) -> str | None:
        if not config.include_instruction:
            return "vLLM's mean pooling cannot leave the instruction tokens out (include_instruction: false)"
        return None

    @classmethod
    def pool_by_hand(cls, hidden: torch.Tensor, skip: int) -> torch.Tensor:
        kept = hidden[skip:]  # empty when the prompt count covers the text: a zero vector, as in ST
        return kept.mean(dim=0) if len(kept) else torch.zeros(hidden.shape[1], dtype=hidden.dtype)

    def forward(self, hidden, attention_mask, prompt_lengths=None):
        return masked_mean(hidden, content_mask(attention_mask, self._prompt_lengths(prompt_lengths)))


class LatentAttentionPooling(Pooling):
    """NV-Embed's latent-attention layer followed by mean pooling.

    Queries come from the token states, keys and values from ``num_latents`` trainable
    vectors; a pre-norm residual block (cross-attention, then a GELU MLP) updates the states.
    The two output projections start at zero, so an untrained head equals mean pooling and
    training starts from the backbone's own representation. The head runs in its own dtype
    (fp32 by default) whatever the backbone's dtype.
    """

    kind = "latent_attention"
    by_hand = False

    @classmethod
    def vllm_unsupported(cls, config: PoolingConfig) -> str | None:
        return "vLLM has no latent-attention pooling head"

    def __init__(self, config: PoolingConfig, hidden_size: int) -> None:
        super().__init__(config, hidden_size)
        if hidden_size % config.num_heads:
            raise ValueError(f"pooling.num_heads={config.num_heads} must divide the hidden size {hidden_size}")
        self.latents = nn.Parameter(torch.randn(config.num_latents, hidden_size) / math.sqrt(hidden_size))
        self.norm_tokens = nn.LayerNorm(hidden_size)
        self.norm_latents = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp_in = nn.Linear(hidden_size, config.mlp_ratio * hidden_size)
        self.mlp_out = nn.Linear(config.mlp_ratio * hidden_size, hidden_size)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.mlp_out.weight)
        nn.init.zeros_(self.mlp_out.bias)

    def forward(self, hidden, attention_mask, prompt_lengths=None):
        x = hidden.to(self.latents.dtype)
        batch, length, width = x.shape
        heads = self.config.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (..., n, width) -> (..., heads, n, width / heads)
            return t.unflatten(-1, (heads, width // heads)).transpose(-3, -2)

        latents = self.norm_latents(self.latents)
        q = split(self.q_proj(self.norm_tokens(x)))
        k = split(self.k_proj(latents)).unsqueeze(0).expand(batch, -1, -1, -1)
        v = split(self.v_proj(latents)).unsqueeze(0).expand(batch, -1, -1, -1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.o_proj(attended)
        x = x + self.mlp_out(F.gelu(self.mlp_in(self.norm_mlp(x))))
        return masked_mean(x, content_mask(attention_mask, self._prompt_lengths(prompt_lengths)))


# Every pooling, by the kind a config names.
POOLINGS: dict[str, type[Pooling]] = {cls.kind: cls for cls in (LastTokenPooling, MeanPooling, LatentAttentionPooling)}


def build_pooling(config: PoolingConfig, hidden_size: int) -> Pooling:
    return POOLINGS[config.kind](config, hidden_size)

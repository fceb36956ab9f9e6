"""EmbeddingModel: backbone + pooling + optional truncation and L2 normalisation.

Build, encode, save, load. Training loops, losses and export live elsewhere; they all go
through :meth:`EmbeddingModel.tokenize` and :meth:`EmbeddingModel.forward`, so the text a
model sees is the same in training, in ``encode`` and (via the export) in every server.

A saved model folder holds::

    llmembed_config.json   our config (backbone, pooling, prompts, lengths, LoRA settings)
    adapter/               peft LoRA adapter (when trained with LoRA), or
    backbone/              full backbone weights (safetensors)
    tokenizer/             the tokenizer as used in training
    pooling/               pooling config and weights
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from llmembed.backbone import (
    BackboneConfig,
    is_bidirectional,
    load_backbone,
    load_tokenizer,
    resolve_backbone_path,
)
from llmembed.config import from_dict
from llmembed.lora import LoraSettings, apply_lora, is_peft_model, load_lora
from llmembed.pooling import Pooling, PoolingConfig, build_pooling
from llmembed.prompts import PromptConfig
from llmembed.tokenization import EmbeddingTokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "llmembed_config.json"
FORMAT_VERSION = 1


@dataclass
class EmbeddingModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraSettings | None = None
    normalize: bool = True
    # Keep the first ``output_dim`` dimensions (Matryoshka); None keeps all.
    output_dim: int | None = None
    # Append EOS to every text; None means "only for last_token pooling".
    append_eos: bool | None = None
    query_max_length: int = 512
    passage_max_length: int = 512

    def __post_init__(self) -> None:
        if self.output_dim is not None and self.output_dim < 1:
            raise ValueError(f"output_dim must be >= 1, got {self.output_dim}")
        for name in ("query_max_length", "passage_max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")

    @property
    def appends_eos(self) -> bool:
        return self.pooling.kind == "last_token" if self.append_eos is None else self.append_eos

    @property
    def padding_side(self) -> str:
        # Decoder convention for last-token pooling; both sides give the same vectors.
        return "left" if self.pooling.kind == "last_token" else "right"


class EmbeddingModel(nn.Module):
    def __init__(self, config: EmbeddingModelConfig, backbone: nn.Module, tokenizer, pooling: Pooling) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.text_tokenizer = EmbeddingTokenizer(tokenizer, config.appends_eos, config.padding_side)
        if config.output_dim is not None and config.output_dim > pooling.output_dim:
            raise ValueError(f"output_dim={config.output_dim} exceeds the pooled width {pooling.output_dim}")

    # ------------------------------------------------------------------ build / load / save
    @classmethod
    def build(cls, config: EmbeddingModelConfig | None = None, gradient_checkpointing: bool = False,
              **backbone_kwargs: Any) -> "EmbeddingModel":
        """A fresh model: pretrained backbone, new pooling head, fresh LoRA if configured.

        ``gradient_checkpointing`` switches on non-reentrant checkpointing, which works with
        frozen inputs (LoRA) without the reentrant variant's ``requires_grad`` workaround.
        """
        config = config or EmbeddingModelConfig()
        path = resolve_backbone_path(config.backbone.name_or_path)
        tokenizer = load_tokenizer(path, config.backbone.trust_remote_code)
        backbone = load_backbone(config.backbone, path, **backbone_kwargs)
        if config.backbone.quantization is not None and config.lora is not None:
            from peft import prepare_model_for_kbit_training

            backbone = prepare_model_for_kbit_training(
                backbone,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora is not None:
            backbone = apply_lora(backbone, config.lora)
        pooling = build_pooling(config.pooling, backbone.config.hidden_size)
        return cls(config, backbone, tokenizer, pooling)

    def save(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model folder. ``state_dict`` (a full ``self.state_dict()``, e.g. gathered
        from ZeRO-3 shards) overrides the live parameters."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backbone_state = pooling_state = None
        if state_dict is not None:
            backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            pooling_state = {k[len("pooling.") :]: v for k, v in state_dict.items() if k.startswith("pooling.")}
        if is_peft_model(self.backbone):
            self.backbone.save_pretrained(folder / "adapter", state_dict=backbone_state, safe_serialization=True)
        else:
            self.backbone.save_pretrained(folder / "backbone", state_dict=backbone_state, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if pooling_state is not None:
            head = build_pooling(self.pooling.config, self.pooling.hidden_size)
            head.load_state_dict(pooling_state)
            head.save(folder / "pooling")
        else:
            self.pooling.save(folder / "pooling")
        payload = {"format_version": FORMAT_VERSION, **asdict(self.config)}
        (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, folder: str | Path, trainable: bool = False, **backbone_overrides: Any) -> "EmbeddingModel":
        """Load a folder written by :meth:`save`. ``backbone_overrides`` replace fields of the
        saved backbone config (e.g. ``dtype="bfloat16"``)."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not an llmembed model folder (no {CONFIG_FILE})")
        payload = json.loads(config_path.read_text())
        version = payload.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        config = from_dict(EmbeddingModelConfig, payload, prefix="")
        if backbone_overrides:
            config = replace(config, backbone=replace(config.backbone, **backbone_overrides))
        tokenizer = load_tokenizer(str(folder / "tokenizer"), config.backbone.trust_remote_code)
        if (folder / "adapter").is_dir():
            backbone = load_backbone(config.backbone)
            backbone = load_lora(backbone, str(folder / "adapter"), trainable=trainable)
        else:
            backbone = load_backbone(config.backbone, str(folder / "backbone"))
        pooling = Pooling.load(folder / "pooling")
        return cls(config, backbone, tokenizer, pooling)

    # ------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def bidirectional(self) -> bool:
        return is_bidirectional(self.base_model)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        return self.backbone.get_base_model() if is_peft_model(self.backbone) else self.backbone

    @property
    def embedding_dim(self) -> int:
        return self.config.output_dim or self.pooling.output_dim

    def format(
        self, texts: Sequence[str], instruction: str | Sequence[str | None] | None, is_query: bool
    ) -> tuple[list[str], list[str]]:
        """Prompted texts and their prefixes. ``instruction`` may be one string for all texts or
        one per text (mixed-task batches)."""
        if instruction is None or isinstance(instruction, str):
            prefix = self.config.prompts.prefix(instruction, is_query)
            return [prefix + t for t in texts], [prefix] * len(texts)
        if len(instruction) != len(texts):
            raise ValueError(f"{len(instruction)} instructions for {len(texts)} texts")
        prefixes = [self.config.prompts.prefix(i, is_query) for i in instruction]
        return [p + t for p, t in zip(prefixes, texts)], prefixes

    def tokenize(
        self,
        texts: Sequence[str],
        instruction: str | Sequence[str | None] | None = None,
        is_query: bool | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for raw texts: prompt, tokens, EOS, padding, prompt lengths."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of texts, not a single string")
        is_query = instruction is not None if is_query is None else is_query
        if max_length is None:
            max_length = self.config.query_max_length if is_query else self.config.passage_max_length
        formatted, prefixes = self.format(texts, instruction, is_query)
        return self.text_tokenizer(formatted, prefixes, max_length)

    # ------------------------------------------------------------------ forward / encode
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        embeddings = self.pooling(hidden, attention_mask, prompt_lengths)
        if self.config.output_dim is not None:
            embeddings = embeddings[:, : self.config.output_dim]
        if self.config.normalize if normalize is None else normalize:
            embeddings = nn.functional.normalize(embeddings.float(), p=2, dim=-1)
        return embeddings

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        *,
        is_query: bool | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
        normalize: bool | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        """Embed ``texts``. Passing ``instruction`` (or ``is_query=True``, which uses the
        default instruction) formats them as queries; otherwise as passages.

        Texts are processed longest first so batches carry little padding; results come
        back in input order as float32.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32) if convert_to_numpy else torch.zeros(0, self.embedding_dim)
        is_query = instruction is not None if is_query is None else is_query
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress_bar is None:
            show_progress_bar = len(texts) > 8 * batch_size
        was_training = self.training
        self.eval()
        chunks: list[torch.Tensor] = []
        try:
            from tqdm.auto import tqdm

            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="encode", disable=not show_progress_bar, unit="batch"):
                batch_texts = [texts[i] for i in order[start : start + batch_size]]
                batch = self.tokenize(batch_texts, instruction, is_query, max_length)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                chunks.append(self(**batch, normalize=normalize).float().cpu())
        finally:
            self.train(was_training)
        sorted_embeddings = torch.cat(chunks)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order)] = sorted_embeddings
        return embeddings.numpy() if convert_to_numpy else embeddings

"""EmbeddingModel: backbone + pooling + optional truncation and L2 normalisation.

Build, encode, save, load. Training loops, losses and export live elsewhere. Every fact about
how a text becomes a vector (prompts, EOS, lengths, pooling, normalisation, attention
direction) is the model's :class:`~llmembed.serving.ServingContract`; texts become tokens only
through :attr:`EmbeddingModel.text_tokenizer`, which follows it.

A saved model folder holds::

    llmembed_serving.json  the serving contract (the only place its facts are saved)
    llmembed_config.json   how to rebuild the network: backbone source and dtype, LoRA settings
    adapter/               peft LoRA adapter (when trained with LoRA), or
    backbone/              full backbone weights (safetensors)
    tokenizer/             the tokenizer as used in training
    pooling/               pooling head weights (latent attention only)

:meth:`EmbeddingModel.load` also reads an export of :mod:`llmembed.serve.export` (merged weights,
the same ``llmembed_serving.json``), so ``encode`` can be compared with every server.
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
    DAMAGED_WEIGHTS,
    BackboneConfig,
    damaged_weights_message,
    is_bidirectional,
    load_backbone,
    load_tokenizer,
    resolve_backbone_path,
)
from llmembed.config import ConfigError, bounded, check_ranges, from_dict
from llmembed.lora import LoraSettings, apply_lora, is_peft_model, load_lora
from llmembed.packing import pack
from llmembed.pooling import Pooling, PoolingConfig, build_pooling
from llmembed.prompts import PromptConfig
from llmembed.remote_code import check_no_remote_code
from llmembed.resolve import missing_tokenizer_files, missing_weight_files
from llmembed.serving import SERVING_FILE, ServingContract
from llmembed.st_layout import pooling_weights_dir
from llmembed.tokenization import EmbeddingTokenizer, Instructions

logger = logging.getLogger(__name__)

CONFIG_FILE = "llmembed_config.json"
FORMAT_VERSION = 2
# Backbone settings that are serving facts: saved in the contract, not in llmembed_config.json.
_SERVING_BACKBONE_KEYS = ("bidirectional",)


@dataclass
class EmbeddingModelConfig:
    """What a user chooses. :meth:`contract` resolves the serving facts from it."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraSettings | None = None
    normalize: bool = True
    # Keep the first ``output_dim`` dimensions (Matryoshka); None keeps all.
    output_dim: int | None = bounded(None, ge=1)
    # The prefix widths the model was trained to serve (Matryoshka); the trainer sets them
    # from loss.matryoshka_dims, and the export tells sentence-transformers and vLLM.
    matryoshka_dims: list[int] | None = bounded(None, ge=1)
    # Append EOS to every text; None means "only for last_token pooling".
    append_eos: bool | None = None
    # The serving length: the longest input encode, sentence-transformers and vLLM embed.
    # Training can cut shorter (data.query_max_length / data.passage_max_length).
    max_length: int = bounded(512, ge=2)  # room for one token and EOS

    def __post_init__(self) -> None:
        check_ranges(self)

    def contract(self) -> ServingContract:
        return ServingContract.from_config(self)

    def build_dict(self) -> dict[str, Any]:
        """The non-serving part, as saved in ``llmembed_config.json``."""
        backbone = {k: v for k, v in asdict(self.backbone).items() if k not in _SERVING_BACKBONE_KEYS}
        return {"backbone": backbone, "lora": asdict(self.lora) if self.lora is not None else None}

    @classmethod
    def from_parts(cls, build: dict[str, Any], contract: ServingContract, where: str = "") -> "EmbeddingModelConfig":
        """Rebuild a config from ``llmembed_config.json``'s content and the saved contract."""
        unknown = sorted(set(build) - {"backbone", "lora"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}")
        backbone = from_dict(BackboneConfig, {**build.get("backbone", {}), "bidirectional": not contract.is_causal},
                             prefix="backbone")
        lora = from_dict(LoraSettings, build["lora"], prefix="lora") if build.get("lora") is not None else None
        return cls(backbone=backbone, pooling=contract.pooling, prompts=contract.prompts, lora=lora,
                   normalize=contract.normalize, output_dim=contract.output_dim, append_eos=contract.append_eos,
                   max_length=contract.max_length, matryoshka_dims=contract.matryoshka_dims)


def missing_files(folder: str | Path) -> list[str]:
    """What a trained model folder or an export lacks to load (paths relative to it): a
    half-copied folder is named with its missing files instead of failing deep in a loader."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        missing = [] if (folder / SERVING_FILE).is_file() else [SERVING_FILE]
        missing += missing_tokenizer_files(folder / "tokenizer", "tokenizer/")
        if (folder / "adapter").is_dir():
            missing += [f"adapter/{n}" for n in ("adapter_config.json", "adapter_model.safetensors")
                        if not (folder / "adapter" / n).is_file()]
        else:
            missing += [] if (folder / "backbone" / "config.json").is_file() else ["backbone/config.json"]
            missing += missing_weight_files(folder / "backbone", "backbone/")
        return missing
    missing = [name for name in (SERVING_FILE, "config.json") if not (folder / name).is_file()]
    missing += missing_tokenizer_files(folder)
    return missing + missing_weight_files(folder, "")


def model_inputs(model_dir: str | Path) -> list[Path]:
    """What loading a model folder reads: the folder, and for a LoRA folder the backbone it
    names (an output must not land in either)."""
    folder = Path(model_dir)
    inputs = [folder]
    config_file = folder / CONFIG_FILE
    if (folder / "adapter").is_dir() and config_file.is_file():
        try:
            source = json.loads(config_file.read_text()).get("backbone", {}).get("name_or_path")
        except ValueError:
            source = None
        if source and Path(source).is_dir():
            inputs.append(Path(source))
    return inputs


class EmbeddingModel(nn.Module):
    def __init__(self, config: EmbeddingModelConfig, backbone: nn.Module, tokenizer, pooling: Pooling,
                 contract: ServingContract | None = None) -> None:
        super().__init__()
        self.config = config
        self.contract = contract if contract is not None else config.contract()
        self.backbone = backbone
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.text_tokenizer = EmbeddingTokenizer(tokenizer, self.contract)
        if self.contract.output_dim is not None and self.contract.output_dim > pooling.output_dim:
            raise ValueError(f"output_dim={self.contract.output_dim} exceeds the pooled width {pooling.output_dim}")
        if self.contract.matryoshka_dims and max(self.contract.matryoshka_dims) > self.embedding_dim:
            raise ValueError(f"matryoshka_dims {self.contract.matryoshka_dims} exceed the embedding width "
                             f"{self.embedding_dim}")
        positions = getattr(self.base_model.config, "max_position_embeddings", None)
        if positions is not None and self.contract.max_length > positions:
            raise ValueError(f"max_length={self.contract.max_length} exceeds the backbone's "
                             f"max_position_embeddings ({positions})")

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
        self.pooling.save_weights(folder / "pooling", pooling_state)
        self.contract.save(folder)
        payload = {"format_version": FORMAT_VERSION, **self.config.build_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, trainable: bool = False, trust_remote_code: bool = False,
             **backbone_overrides: Any) -> "EmbeddingModel":
        """Load a folder written by :meth:`save`, or an export. ``backbone_overrides`` replace
        fields of the saved backbone config (e.g. ``dtype="bfloat16"``).

        Remote code runs only when the caller says so (``trust_remote_code``): a folder cannot
        switch it on for itself, and one that needs it is refused with a message saying how.
        """
        folder = Path(folder)
        check_no_remote_code(folder, trust_remote_code)
        if (folder / CONFIG_FILE).is_file() or (folder / SERVING_FILE).is_file():
            missing = missing_files(folder)
            if missing:
                raise FileNotFoundError(f"{folder}: incomplete model folder (half copied?), missing "
                                        f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
            load = cls._load_trained if (folder / CONFIG_FILE).is_file() else cls._load_export
            try:
                return load(folder, trainable, trust_remote_code, backbone_overrides)
            except DAMAGED_WEIGHTS as err:
                raise ValueError(damaged_weights_message(folder, err)) from None
        raise FileNotFoundError(f"{folder} is not an llmembed model folder (no {CONFIG_FILE}) nor an llmembed "
                                f"export (no {SERVING_FILE})")

    @classmethod
    def _load_trained(cls, folder: Path, trainable: bool, trust_remote_code: bool,
                      overrides: dict[str, Any]) -> "EmbeddingModel":
        config_path = folder / CONFIG_FILE
        payload = json.loads(config_path.read_text())
        version = payload.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{config_path}: format_version {version!r} is not supported (expected "
                              f"{FORMAT_VERSION}); it was written by another llmembed version")
        if payload.get("backbone", {}).get("trust_remote_code") and not trust_remote_code:
            raise ValueError(f"{config_path} was trained with trust_remote_code: its backbone runs code from its "
                             "own files. Load it only if you trust them: pass trust_remote_code=True "
                             "(--trust-remote-code on the command line)")
        payload.get("backbone", {})["trust_remote_code"] = trust_remote_code
        contract = ServingContract.load(folder)
        config = EmbeddingModelConfig.from_parts(payload, contract, where=str(config_path))
        if overrides:
            config = replace(config, backbone=replace(config.backbone, **overrides))
        tokenizer = load_tokenizer(str(folder / "tokenizer"), config.backbone.trust_remote_code)
        if (folder / "adapter").is_dir():
            # The adapter's base is another folder, read like this one.
            check_no_remote_code(resolve_backbone_path(config.backbone.name_or_path), trust_remote_code)
            backbone = load_backbone(config.backbone)
            backbone = load_lora(backbone, str(folder / "adapter"), trainable=trainable)
        else:
            backbone = load_backbone(config.backbone, str(folder / "backbone"))
        pooling = build_pooling(contract.pooling, backbone.config.hidden_size)
        pooling.load_weights(folder / "pooling")
        return cls(config, backbone, tokenizer, pooling, contract)

    @classmethod
    def _load_export(cls, folder: Path, trainable: bool, trust_remote_code: bool,
                     overrides: dict[str, Any]) -> "EmbeddingModel":
        contract = ServingContract.load(folder)
        backbone_config = replace(BackboneConfig(str(folder), bidirectional=not contract.is_causal,
                                                 trust_remote_code=trust_remote_code), **overrides)
        config = EmbeddingModelConfig.from_parts({}, contract)
        config = replace(config, backbone=backbone_config)
        tokenizer = load_tokenizer(str(folder), backbone_config.trust_remote_code)
        backbone = load_backbone(backbone_config, str(folder))
        pooling = build_pooling(contract.pooling, backbone.config.hidden_size)
        weights = pooling_weights_dir(folder)
        if weights is not None:
            pooling.load_weights(weights, prefix="head.")
        return cls(config, backbone, tokenizer, pooling, contract)

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
        return self.contract.output_dim or self.pooling.output_dim

    def tokenize(self, texts: Sequence[str], instruction: Instructions = None, is_query: bool | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for raw texts (see :class:`EmbeddingTokenizer`)."""
        return self.text_tokenizer(texts, instruction, is_query=is_query, max_length=max_length)

    # ------------------------------------------------------------------ forward / encode
    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pack_tokens: int | None = None) -> torch.Tensor:
        """The backbone's last hidden states, one per token (what pooling and MNTP read).

        With ``pack_tokens`` the real tokens run packed, without padding, in rows of at most
        that many tokens (:mod:`llmembed.packing`); the states come back in the padded layout."""
        if pack_tokens is None:
            return self._last_hidden(input_ids=input_ids, attention_mask=attention_mask)
        packed = pack(input_ids, attention_mask, pack_tokens, self.tokenizer.pad_token_id or 0)
        blocks = None
        if self.bidirectional:  # transformers' bidirectional mask ignores packed position_ids
            config = self.base_model.config
            blocks = packed.block_mask(config._attn_implementation, self.base_model.get_input_embeddings().weight.dtype)
        return packed.unpack(self._last_hidden(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                               attention_mask=blocks))

    def _last_hidden(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        outputs = self.backbone(**inputs, use_cache=False)
        return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
        normalize: bool | None = None,
        pack_tokens: int | None = None,
    ) -> torch.Tensor:
        hidden = self.token_states(input_ids, attention_mask, pack_tokens)
        embeddings = self.pooling(hidden, attention_mask, prompt_lengths)
        if self.contract.output_dim is not None:
            embeddings = embeddings[:, : self.contract.output_dim]
        if self.contract.normalize if normalize is None else normalize:
            embeddings = nn.functional.normalize(embeddings.float(), p=2, dim=-1)
        return embeddings

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: Instructions = None,
        *,
        is_query: bool | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
        normalize: bool | None = None,
        convert_to_numpy: bool = True,
        dim: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed ``texts``. Passing ``instruction`` (or ``is_query=True``, which uses the
        default instruction) formats them as queries; otherwise as passages. Texts longer than
        the serving length (``contract.max_length``, or ``max_length``) are cut, keeping EOS.
        ``dim`` keeps the first ``dim`` dimensions (then normalises, when the model does): the
        Matryoshka prefixes the model was trained for are in ``contract.matryoshka_dims``.

        Texts are processed longest first so batches carry little padding; results come
        back in input order as float32.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        texts = list(texts)
        if dim is not None and not 1 <= dim <= self.embedding_dim:
            raise ValueError(f"dim={dim}: choose 1 to {self.embedding_dim}, the model's width")
        width = dim or self.embedding_dim
        if not texts:
            return np.zeros((0, width), dtype=np.float32) if convert_to_numpy else torch.zeros(0, width)
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
                rows = order[start : start + batch_size]
                batch_instruction = instruction if instruction is None or isinstance(instruction, str) else [
                    instruction[i] for i in rows]
                batch = self.tokenize([texts[i] for i in rows], batch_instruction, is_query, max_length)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if dim is None:
                    chunks.append(self(**batch, normalize=normalize).float().cpu())
                else:
                    prefix = self(**batch, normalize=False)[:, :dim].float()
                    if self.contract.normalize if normalize is None else normalize:
                        prefix = nn.functional.normalize(prefix, p=2, dim=-1)
                    chunks.append(prefix.cpu())
        finally:
            self.train(was_training)
        sorted_embeddings = torch.cat(chunks)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order)] = sorted_embeddings
        return embeddings.numpy() if convert_to_numpy else embeddings

"""The serving contract: every fact that decides which vector a text gets, in one object.

Pooling (kind, instruction exclusion, head shape), normalisation, output width, EOS appending,
padding side, the longest input, the prompts and the attention direction. It is computed once
from the model config (:meth:`ServingContract.from_config`), saved once per model folder
(``llmembed_serving.json``, in trained folders and exports alike) and read everywhere else:
our tokenization and ``encode``, the training collator, the export, the sentence-transformers
files and the vLLM-facing ``config.json``/tokenizer are all *derived* from it. Keeping these
facts in one place is the point: train/serve mismatches (an EOS lost, a pooling config
ignored, a length cut differently) are the most reported bug class across embedding trainers.

Lengths: ``max_length`` is the serving length, the longest input any path embeds (longer
texts are cut at its end and keep their EOS). Training may cut queries and passages shorter
(``data.query_max_length`` / ``data.passage_max_length``) to save compute; that is a data
budget, not a property of the model, so ``encode``, sentence-transformers and vLLM all embed
every text up to ``max_length`` the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from llmembed.config import ConfigError, from_dict
from llmembed.pooling import POOLINGS, PoolingConfig
from llmembed.prompts import PromptConfig


SERVING_FILE = "llmembed_serving.json"
FORMAT_VERSION = 1


class _BackboneChoices(Protocol):
    bidirectional: bool


class ModelChoices(Protocol):
    """What the contract reads from a model config (``llmembed.model.EmbeddingModelConfig``
    satisfies it): the contract sits below the model, so it names the fields, not the class."""

    pooling: PoolingConfig
    prompts: PromptConfig
    normalize: bool
    output_dim: int | None
    matryoshka_dims: Sequence[int] | None
    append_eos: bool | None
    max_length: int
    backbone: _BackboneChoices


@dataclass(frozen=True)
class ServingContract:
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    normalize: bool = True
    # Keep the first ``output_dim`` dimensions before normalising (Matryoshka); None keeps all.
    output_dim: int | None = None
    # Prefix widths trained with the Matryoshka loss (each a usable embedding once truncated
    # and normalised); None: the model was not trained for truncation.
    matryoshka_dims: list[int] | None = None
    append_eos: bool = True
    padding_side: str = "left"
    max_length: int = 512
    is_causal: bool = True

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.output_dim is not None and self.output_dim < 1:
            raise ValueError(f"output_dim must be >= 1, got {self.output_dim}")
        if self.matryoshka_dims is not None and (not self.matryoshka_dims or min(self.matryoshka_dims) < 1
                                                 or len(set(self.matryoshka_dims)) != len(self.matryoshka_dims)):
            raise ValueError(f"matryoshka_dims must be distinct widths >= 1, got {self.matryoshka_dims}")

    @classmethod
    def from_config(cls, config: "ModelChoices") -> "ServingContract":
        """Resolve a model config's choices (``append_eos: null`` means "for last-token
        pooling") into the facts every path uses."""
        last_token = POOLINGS[config.pooling.kind].reads_last_token
        return cls(
            pooling=config.pooling,
            prompts=config.prompts,
            normalize=config.normalize,
            output_dim=config.output_dim,
            matryoshka_dims=list(config.matryoshka_dims) if config.matryoshka_dims else None,
            append_eos=last_token if config.append_eos is None else config.append_eos,
            # Decoder convention for last-token pooling; our pooling gives the same vectors
            # under either side, and the export's tokenizer carries this one.
            padding_side="left" if last_token else "right",
            max_length=config.max_length,
            is_causal=not config.backbone.bidirectional,
        )

    # ------------------------------------------------------------------ prompts
    def query_prefix(self, instruction: str | None = None) -> str:
        return self.prompts.query_prefix(instruction)

    def passage_prefix(self) -> str:
        return self.prompts.passage_prefix()

    # ------------------------------------------------------------------ what servers can do
    def st_pooling_mode(self) -> str | None:
        """sentence-transformers' ``Pooling`` mode for this pooling, or None when it has none
        (latent attention ships a module of our own)."""
        return POOLINGS[self.pooling.kind].st_pooling_mode

    def vllm_unsupported(self) -> str | None:
        """Why vLLM cannot serve this contract, or None when it can (from the export alone)."""
        return POOLINGS[self.pooling.kind].vllm_unsupported(self.pooling)

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SERVING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ServingContract":
        path = Path(folder) / SERVING_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {SERVING_FILE}; was it written by llmembed?")
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        version = payload.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            return from_dict(cls, payload)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

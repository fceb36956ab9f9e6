"""One YAML per run, with dotted command-line overrides (``--set train.lr=1e-4``).

Unknown keys and wrong types are refused with the key's full path. Relative paths in a config
(data files, output folder) are relative to the working directory the command runs in, as in
Hugging Face's and DeepSpeed's own configs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmembed.config import ConfigError, bounded, check_ranges, from_dict
from llmembed.losses.router import LOSS_NAMES, LossConfig
from llmembed.model import EmbeddingModelConfig
from llmembed.train.evaluation import EvalConfig
from llmembed.train.remine import RemineConfig

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class DatasetConfig:
    path: str
    name: str | None = None
    weight: float = bounded(1.0, ge=0.0)
    # Used for records without their own instruction; None falls back to prompts.default_instruction.
    instruction: str | None = None
    # False for tasks where other queries' positives are not negatives (classification labels).
    in_batch_negatives: bool = True
    # 1 positive + (group_size - 1) hard negatives per query; None uses data.group_size.
    group_size: int | None = bounded(None, ge=1)
    # "auto": SimCSE for plain {"text"} records, CoSENT when every record carries a score, InfoNCE
    # otherwise (llmembed.losses.router.LOSSES, asked in order).
    loss: str = "auto"
    # Distil a teacher's scores over each query's candidates (InfoNCE datasets): "embedding"
    # (the mining model's scores) or "reranker" (llmembed.mine --cross-encoder), read from the
    # records' meta.mining, or "llm" (the generator's query likelihoods, synth.relabel, from
    # meta.relabel); weighted by loss.distill_weight. None: no distillation.
    teacher_scores: str | None = None

    def __post_init__(self) -> None:
        if self.loss != "auto" and self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be auto or one of {LOSS_NAMES}, got {self.loss!r}")
        check_ranges(self)


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    group_size: int = bounded(2, ge=1)
    skip_invalid: bool = False
    # Keys a record's layout does not read are an error (a misspelt "negative" would drop every
    # hard negative silently); true skips them instead.
    ignore_unknown_keys: bool = False
    # Training cuts (a compute budget, not a model property): queries and passages longer than
    # this are cut while training. None trains at the model's serving length (model.max_length),
    # which encode, sentence-transformers and vLLM always use.
    # At least 2: room for one token and EOS.
    query_max_length: int | None = bounded(None, ge=2)
    passage_max_length: int | None = bounded(None, ge=2)
    # Conan's cross-rank balancing: InfoNCE (retrieval) batches are per_device_batch_size
    # queries shared by every rank, each rank drawing its own share of the hard negatives
    # (each query then meets ranks x (group_size - 1) of them); CoSENT (STS) batches keep
    # distinct rows per rank, so they are ranks x larger.
    balanced_ranks: bool = False
    # Batches of records of similar length (llmembed.data.sampling): each pass is shuffled,
    # cut into windows of length_window batches, sorted by length within a window, and the
    # batches shuffled again. Cuts padding (chatterbot answers run 2 to 260 tokens) at the
    # price of in-batch negatives of similar length.
    group_by_length: bool = False
    length_window: int = bounded(32, ge=1)
    # Where each dataset is kept parsed, as memory-mapped Arrow (llmembed.data.store): None puts
    # it in .llmembed-cache beside the data (or $LLMEMBED_CACHE/data where that folder is read-only).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class OptimConfig:
    lr: float = bounded(1e-4, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0)
    per_device_batch_size: int = bounded(8, ge=1)
    gradient_accumulation_steps: int = bounded(1, ge=1)
    max_steps: int | None = bounded(None, ge=1)
    epochs: float = bounded(1.0, gt=0.0)
    warmup_steps: int = bounded(0, ge=0)
    warmup_ratio: float = bounded(0.0, ge=0.0, le=1.0)
    schedule: str = "linear"
    max_grad_norm: float = bounded(1.0, ge=0.0)  # 0: no clipping
    seed: int = bounded(42, ge=0, lt=2**32)  # numpy's legacy seeding takes 32 bits
    gradient_checkpointing: bool = False
    # Start from a trained model folder's weights (LoRA adapter or full backbone, pooling head);
    # fresh optimizer and schedule. Set for every stage after the first by ``stages``.
    init_from: str | None = None
    # Encode each side of a micro-batch in up to this many passes over rows of similar length:
    # the same embeddings, less padding (worth it on CPUs; on GPUs with ZeRO-3 each pass
    # gathers the weights again). 1: one padded pass.
    length_buckets: int = bounded(1, ge=1, le=16)
    # Padding-free forwards (llmembed.packing): each side's real tokens packed into rows of at
    # most this many tokens, told apart by restarting position_ids. With flash-attention 2 no
    # padding is computed at all (set it to the micro-batch's tokens); on sdpa/eager the rows
    # get a block mask whose attention cost grows with the row, so keep it to a few hundred.
    # Causal or bidirectional (sdpa/eager: bidirectional blocks get an explicit 4-D mask;
    # flash-attention 2 takes none, so that pair is refused). Replaces length_buckets. None:
    # padded forwards.
    pack_tokens: int | None = bounded(None, ge=1)
    deepspeed: str = "zero2"  # zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_ranges(self)
        if self.pack_tokens is not None and self.length_buckets > 1:
            raise ValueError(f"pack_tokens={self.pack_tokens} leaves no padding to bucket: set length_buckets: 1 "
                             f"(got {self.length_buckets})")


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/run"
    save_every: int = bounded(0, ge=0)  # optimizer steps; 0 saves only at the end
    # Checkpoints kept (0 keeps all). With 2 or more, a damaged newest checkpoint still leaves
    # an intact one for --resume auto to fall back to.
    keep_last: int = bounded(2, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class LoggingConfig:
    log_every: int = bounded(1, ge=1)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "llmembed"
    progress_bar: bool = True
    # JSON file {"queries": [...], "passages": [...]}: encoded by the in-memory model at the end
    # of training into probe_embeddings.json, a reference for checking saved/exported models.
    probe_file: str | None = None

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class TrainConfig:
    model: EmbeddingModelConfig = field(default_factory=EmbeddingModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    remine: RemineConfig = field(default_factory=RemineConfig)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _read_tree(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The YAML at ``path`` with ``KEY=VALUE`` overrides applied (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    where = "<overrides>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree, where


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML), apply ``KEY=VALUE`` overrides (values parsed as YAML), validate.
    A config with ``stages`` is read with :func:`load_plan`."""
    tree, where = _read_tree(path, overrides)
    if "stages" in tree:
        raise ConfigError(f"{where}: has stages; read it with load_plan (launch/train.py does)")
    try:
        return from_dict(TrainConfig, tree)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


@dataclass
class Stage:
    name: str  # "" for a config without stages
    config: TrainConfig


_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_plan(path: str | Path | None, overrides: list[str] | None = None) -> list[Stage]:
    """The run's stages, each a whole config: the shared sections with the stage's own laid over
    them (a stage's value wins over the shared one, ``--set`` included); stage ``name`` trains
    into ``<checkpoint.output_dir>/<name>`` and every stage after the first starts from the
    previous stage's ``final`` model (``train.init_from``). Without ``stages``: one stage."""
    tree, where = _read_tree(path, overrides)
    stages = tree.pop("stages", None)
    if stages is None:
        try:
            return [Stage("", from_dict(TrainConfig, tree))]
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: stages: expected a non-empty list of mappings")
    base_out = str(tree.get("checkpoint", {}).get("output_dir", CheckpointConfig.output_dir))
    plan: list[Stage] = []
    previous: str | None = None
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not _STAGE_NAME.match(stage["name"]):
            raise ConfigError(f"{where}: stages[{i}]: each stage is a mapping with a name (letters, digits, _ . -)")
        name = stage["name"]
        if any(s.name == name for s in plan):
            raise ConfigError(f"{where}: stages[{i}]: the name {name!r} is used twice")
        merged = _merged(tree, {k: v for k, v in stage.items() if k != "name"})
        output_dir = f"{base_out}/{name}"
        merged.setdefault("checkpoint", {})["output_dir"] = output_dir
        if previous is not None:
            merged.setdefault("train", {}).setdefault("init_from", f"{previous}/final")
        try:
            plan.append(Stage(name, from_dict(TrainConfig, merged)))
        except ConfigError as err:
            raise ConfigError(f"{where}: stages[{i}] ({name}): {err}") from None
        previous = output_dir
    return plan

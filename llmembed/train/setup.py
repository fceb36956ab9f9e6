"""Everything before the first step: join the process group, load the data, build the model,
hand it to ``deepspeed.initialize`` and, when asked, resume from a checkpoint.

The order matters and is kept in one place: the ZeRO-3 hook must exist before the model is
loaded (so weights are partitioned while loading), the step count must be known before the LR
schedule is made, and the RNG states are restored last (after model building consumed
randomness), so a resumed run continues the very random stream the interrupted one had.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmembed.backbone import resolve_dtype
from llmembed.data.collate import ContrastiveCollator, LoadedDataset, teacher_scores
from llmembed.data.readers import ReadReport
from llmembed.data.sampling import HomogeneousBatchSampler, capped_lengths, token_lengths
from llmembed.data.store import open_records
from llmembed.losses.base import LossParts
from llmembed.losses.router import LossRouter, choose_loss
from llmembed.model import EmbeddingModel, EmbeddingModelConfig
from llmembed.outputs import Kind, check_output
from llmembed import runlock
from llmembed.tokenization import EmbeddingTokenizer
from llmembed.train import checkpoint
from llmembed.train.config import TrainConfig
from llmembed.train.deepspeed_config import (
    build_ds_config,
    offloads_optimizer,
    zero_stage,
)
from llmembed.train.remine import HardNegativeRefresher
from llmembed.train.step import PairEncoder

logger = logging.getLogger("llmembed.train")


@dataclass
class TrainSetup:
    """What the loop needs, built once."""

    config: TrainConfig
    rank: int
    world_size: int
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any  # the LR scheduler DeepSpeed steps
    model: EmbeddingModel
    datasets: list[LoadedDataset]
    read_report: ReadReport
    sampler: HomogeneousBatchSampler
    collator: ContrastiveCollator
    losses: LossRouter
    total_steps: int
    start_step: int
    refresher: HardNegativeRefresher | None = None  # re-mines hard negatives (remine.every > 0)
    # transformers keeps only a weak reference to its DeepSpeed config and asks it whether
    # ZeRO-3 is on (when loading, and in peft/gradient-checkpointing paths): keep it alive.
    hf_deepspeed_config: Any = None
    # The open lock file on output_dir (rank 0): held until the process ends.
    run_lock: Any = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.checkpoint.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher (deepspeed/torchrun) set up, or make a 1-process one."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        # The shared-memory allreduce op is a JIT-compiled C++ extension (~35 s) that needs CPU
        # features not every machine has; gloo is enough for CPU training.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_datasets(config: TrainConfig, skip_invalid: bool) -> tuple[list[LoadedDataset], ReadReport]:
    """Open every dataset (memory-mapped, parsed into the data cache on first use) and fix its
    loss and group size now, from what its records hold."""
    if not config.data.datasets:
        raise ValueError("data.datasets is empty: give at least one JSONL file")
    report = ReadReport()
    loaded = []
    for i, ds in enumerate(config.data.datasets):
        where = f"data.datasets[{i}] ({ds.path})"
        records = open_records(ds.path, skip_invalid=skip_invalid or config.data.skip_invalid, report=report,
                               ignore_unknown_keys=config.data.ignore_unknown_keys, cache_dir=config.data.cache_dir)
        if not len(records):
            raise ValueError(f"{where} has no valid records")
        loss = choose_loss(ds.loss, records.facts, where)
        # Losses without hard negatives compare one passage per query (CoSENT's pairs, SimCSE's views).
        group = (ds.group_size or config.data.group_size) if loss.hard_negatives else 1
        teacher = None
        if ds.teacher_scores is not None:
            if not loss.teacher_scores:
                raise ValueError(f"{where}: teacher_scores distils over hard negatives; loss {loss.name} does not "
                                 "take them (use infonce)")
            teacher = teacher_scores(records, ds.teacher_scores, where)
        loaded.append(LoadedDataset(ds.name or Path(ds.path).stem, records, ds.instruction, ds.in_batch_negatives,
                                    group, loss, teacher, shared_queries=config.data.balanced_ranks and loss.hard_negatives))
    return loaded, report


def grouping_lengths(datasets: list[LoadedDataset], tokenizer: EmbeddingTokenizer,
                     config: TrainConfig) -> list[np.ndarray] | None:
    """Per dataset, the token lengths that length grouping sorts by (None without grouping):
    counted once per tokenizer and kept beside the data, cut at the training lengths."""
    if not config.data.group_by_length:
        return None
    name = f"lengths-{tokenizer.counting_fingerprint()}"
    return [capped_lengths(d.records.cached(name, lambda d=d: token_lengths(d.records, tokenizer.count_tokens)),
                           config.data.passage_max_length, config.data.query_max_length) for d in datasets]


def _with_trained_widths(config: TrainConfig) -> EmbeddingModelConfig:
    """The model config, with the Matryoshka widths the loss trains recorded for serving."""
    dims, model_config = config.loss.matryoshka_dims, config.model
    if not dims:
        return model_config
    if model_config.matryoshka_dims and sorted(model_config.matryoshka_dims) != sorted(dims):
        raise ValueError(f"model.matryoshka_dims {model_config.matryoshka_dims} differ from loss.matryoshka_dims "
                         f"{dims}; set loss.matryoshka_dims only (the trainer records it in the model)")
    return replace(model_config, matryoshka_dims=sorted(dims))


def build_model(config: TrainConfig, ds_config: dict[str, Any]) -> tuple[EmbeddingModel, Any]:
    """The model, loaded partitioned under ZeRO-3; also returns transformers' DeepSpeed hook
    (None below ZeRO-3), which must outlive the model's use."""
    hf_ds = None
    if zero_stage(ds_config) == 3:
        if config.model.backbone.quantization is not None:
            raise ValueError("QLoRA (backbone.quantization) runs with ZeRO-2; set train.deepspeed=zero2")
        # transformers' hook: from_pretrained partitions weights while loading under ZeRO-3.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    model = EmbeddingModel.build(_with_trained_widths(config), gradient_checkpointing=config.train.gradient_checkpointing)
    if config.train.init_from is not None:
        if hf_ds is not None:
            raise ValueError("train.init_from (and stages after the first) runs with ZeRO-2 for now: its weights "
                             "are copied into a whole model, which ZeRO-3 has already partitioned")
        from llmembed.train.init_from import load_start_weights

        load_start_weights(model, config.train.init_from)
    return model, hf_ds


def loss_parts(config: TrainConfig, datasets: list[LoadedDataset], model: EmbeddingModel,
               ds_config: dict[str, Any]) -> list[LossParts]:
    """Per dataset, its loss's checks of the model and what it takes from it (one preparation
    per loss class, shared by its datasets)."""
    made: dict[type, LossParts] = {}
    for ds in datasets:
        if ds.loss not in made:
            made[ds.loss] = ds.loss.prepare(model, config.loss.settings_of(ds.loss), zero_stage(ds_config), ds.name)
    return [made[ds.loss] for ds in datasets]


def _on_device(parts: LossParts, device: torch.device) -> LossParts:
    return replace(parts, head=parts.head.to(device)) if parts.head is not None else parts


def _scheduler_factory(config: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    from transformers import get_scheduler

    opt = config.train
    warmup = opt.warmup_steps or round(opt.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[opt.schedule]

    def make(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    return make


def initialize_engine(model: EmbeddingModel, config: TrainConfig, ds_config: dict[str, Any],
                      total_steps: int) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on the pair encoder; returns (engine, LR scheduler)."""
    import deepspeed

    from llmembed.train.safe_load import use_weights_only_loading

    opt = config.train
    wrapper = PairEncoder(model, config.train.length_buckets, config.train.pack_tokens)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    optimizer = None
    if not offloads_optimizer(ds_config):
        # A plain torch optimizer: no JIT-compiled DeepSpeed op, identical math on every backend.
        optimizer = torch.optim.AdamW(trainable, lr=opt.lr, weight_decay=opt.weight_decay)
    else:
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": opt.lr, "weight_decay": opt.weight_decay}})
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapper,
        optimizer=optimizer,
        model_parameters=trainable if optimizer is None else None,
        lr_scheduler=_scheduler_factory(config, total_steps),
        config=ds_config,
    )
    use_weights_only_loading(engine)
    return engine, scheduler


def resume_step(engine: Any, root: Path, resume: str | None, rank: int) -> int:
    """Load ``resume`` and return its step. A tag must load; ``auto`` takes the newest
    checkpoint that loads on every rank, reporting each damaged one it passes over (a
    truncated file, an empty ``latest``), and starts from scratch only when there is none."""
    if resume is None:
        return 0
    if resume != "auto":
        if not (root / resume).is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint in {root}")
        try:
            step = checkpoint.load(engine, root, resume, rank)
        except Exception as err:  # any damage: a torn file, a missing shard, a refused pickle
            raise ValueError(f"--resume {resume}: checkpoint {root / resume} could not be loaded "
                             f"({_first_line(err)}); --resume auto falls back to an older one") from None
        if rank == 0:
            print(f"resumed from {root / resume} at step {step}")
        return step
    candidates = checkpoint.resume_candidates(root)
    for tag in candidates:
        try:
            step, problem = checkpoint.load(engine, root, tag, rank), ""
        except Exception as err:  # any damage: a torn file, a missing shard, a bad pickle
            step, problem = -1, _first_line(err)
        if _everywhere(step >= 0):
            if rank == 0:
                print(f"resumed from {root / tag} at step {step}")
            return step
        if rank == 0 or problem:
            print(f"warning: checkpoint {root / tag} could not be loaded on rank {rank} ({problem or 'another rank'}); "
                  "trying an older one")
    if candidates:
        raise ValueError(f"--resume auto: none of the checkpoints in {root} could be loaded ({', '.join(candidates)})")
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _everywhere(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank (a collective: every rank calls it)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# A training run's folder, which a rerun continues (--resume): its lock, config or checkpoints.
RUN_KIND = Kind("a training run folder", folder=True,
                recognise=lambda folder: any((folder / name).exists() for name in (
                    ".llmembed-run.lock", checkpoint.CONFIG_FILE, "checkpoints", "final", "metrics.jsonl")))


def config_inputs(config: TrainConfig) -> list[Path]:
    """Every file or folder a run reads, found as the settings that name one (data, backbone,
    teacher, DeepSpeed config...): the run's outputs must stay clear of all of them."""
    found: list[Path] = []

    def walk(value, top: str = "") -> None:
        if top in ("checkpoint", "logging"):  # where the run writes
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, top or key)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, top)
        elif isinstance(value, str) and value and Path(value).exists():
            found.append(Path(value))

    walk(asdict(config))
    return found


def lock_output_dir(output_dir: Path):
    """Hold the run's lock on ``output_dir`` for the life of this process, so a second trainer,
    or a worker that outlived its launcher, is refused instead of interleaving checkpoints and
    metrics with this run."""
    return runlock.hold(output_dir, ".llmembed-run.lock", "training run",
                        "wait for it or stop it, or set checkpoint.output_dir to another folder")


def prepare(config: TrainConfig, resume: str | None = None, skip_invalid: bool = False) -> TrainSetup:
    """Build everything the loop needs, in the order that keeps runs and resumes reproducible."""
    rank, world_size = init_distributed()
    check_output(config.checkpoint.output_dir, inputs=config_inputs(config), kind=RUN_KIND, continues=True,
                 flag="checkpoint.output_dir")
    # Rank 0 writes every file of the run; its lock is the run's.
    run_lock = lock_output_dir(Path(config.checkpoint.output_dir)) if rank == 0 else None
    checkpoints = Path(config.checkpoint.output_dir) / "checkpoints"
    opt = config.train
    candidates = checkpoint.resume_candidates(checkpoints) if resume is not None else []
    if candidates:  # before anything slow
        checkpoint.check_same_run(Path(config.checkpoint.output_dir), asdict(config))
        checkpoint.check_shape(checkpoints, candidates[0] if resume == "auto" else resume, opt.per_device_batch_size,
                               world_size, checkpoint.saved_config(Path(config.checkpoint.output_dir)))
    seed_everything(opt.seed)
    datasets, report = load_datasets(config, skip_invalid)
    if report.skipped_total and rank == 0:
        print(f"skipped {report.skipped_total} invalid record(s): {dict(report.skipped)}")
    ds_config = build_ds_config(config, world_size, resolve_dtype(config.model.backbone.dtype) == torch.bfloat16)
    model, hf_ds = build_model(config, ds_config)
    parts = loss_parts(config, datasets, model, ds_config)
    masking = next((p.masking for p in parts if p.masking is not None), None)
    # Before DeepSpeed starts: a bad data length fails in seconds, not after engine setup.
    teacher = None
    if config.loss.structure_weight > 0 or config.loss.guided_masking:
        from llmembed.serve.encoders import load_encoder

        teacher = load_encoder(config.loss.teacher_model)
    collator = ContrastiveCollator(model.text_tokenizer, datasets, seed=opt.seed,
                                   query_max_length=config.data.query_max_length,
                                   passage_max_length=config.data.passage_max_length, teacher_encoder=teacher,
                                   rank=rank, world_size=world_size, token_masking=masking)
    sampler = HomogeneousBatchSampler(
        [len(d.records) for d in datasets],
        [ds.weight for ds in config.data.datasets],
        opt.per_device_batch_size * world_size,
        seed=opt.seed,
        rank=rank,
        world_size=world_size,
        shared=[d.shared_queries for d in datasets],
        lengths=grouping_lengths(datasets, model.text_tokenizer, config),
        window=config.data.length_window,
    )
    # Before DeepSpeed starts, like every data check (a corpus too small for the rank window).
    refresher = HardNegativeRefresher(config.remine, datasets) if config.remine.enabled else None
    accum = opt.gradient_accumulation_steps
    total_steps = opt.max_steps or max(1, math.ceil(opt.epochs * sampler.steps_per_epoch / accum))
    engine, scheduler = initialize_engine(model, config, ds_config, total_steps)
    start_step = resume_step(engine, checkpoints, resume, rank)
    if refresher is not None and start_step > 0:
        refresher.load(checkpoints / f"{checkpoint.TAG_PREFIX}{start_step}")
    return TrainSetup(config, rank, world_size, engine, scheduler, model, datasets, report, sampler, collator,
                      LossRouter(datasets, config.loss, [_on_device(p, engine.device) for p in parts],
                                 model.contract.normalize), total_steps, start_step, refresher, hf_ds, run_lock)

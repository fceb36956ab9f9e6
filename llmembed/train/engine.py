"""A thin training loop on ``deepspeed.initialize``.

DeepSpeed owns the optimizer step, LR schedule stepping, gradient accumulation, clipping,
bf16 and checkpoint files. We own the step itself, because the contrastive step needs it:
queries and passages are encoded separately, embeddings are gathered across ranks with
gradients, and the loss sees the whole global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmembed.backbone import resolve_dtype
from llmembed.data.collate import ContrastiveCollator, LoadedDataset
from llmembed.data.readers import ReadReport, read_jsonl
from llmembed.data.sampling import HomogeneousBatchSampler
from llmembed.distributed import all_reduce_mean
from llmembed.losses import CoSENTLoss, InfoNCELoss
from llmembed.model import EmbeddingModel
from llmembed.train import checkpoint
from llmembed.train.config import TrainConfig
from llmembed.train.deepspeed_config import build_ds_config, offloads_optimizer, zero_stage
from llmembed.train.logging import RunLogger

logger = logging.getLogger("llmembed.train")
CRASH_ENV = "LLMEMBED_CRASH_AFTER_STEP"


class PairEncoder(nn.Module):
    """What DeepSpeed wraps: one forward encodes a query batch and a passage batch."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, query: dict, passage: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(**query), self.model(**passage)


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    losses: list[float]
    skipped_records: int
    samples_per_s: float
    tokens_per_s: float


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
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_datasets(config: TrainConfig, skip_invalid: bool) -> tuple[list[LoadedDataset], ReadReport]:
    if not config.data.datasets:
        raise ValueError("data.datasets is empty: give at least one JSONL file")
    report = ReadReport()
    loaded = []
    for i, ds in enumerate(config.data.datasets):
        records = read_jsonl(ds.path, skip_invalid=skip_invalid or config.data.skip_invalid, report=report)
        if not records:
            raise ValueError(f"data.datasets[{i}] ({ds.path}) has no valid records")
        loss = ds.loss
        if loss == "auto":
            loss = "cosent" if all(r.score is not None for r in records) else "infonce"
        if loss == "cosent" and any(r.score is None for r in records):
            raise ValueError(f"data.datasets[{i}] ({ds.path}): loss cosent needs a score on every record")
        group = 1 if loss == "cosent" else (ds.group_size or config.data.group_size)
        loaded.append(LoadedDataset(ds.name or Path(ds.path).stem, records, ds.instruction, ds.in_batch_negatives,
                                    group, loss))
    return loaded, report


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _scheduler_factory(config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    opt = config.train
    warmup = opt.warmup_steps or int(round(opt.warmup_ratio * total_steps))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[opt.schedule]

    def make(optimizer):
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    return make


def train(config: TrainConfig, resume: str | None = None, skip_invalid: bool = False) -> TrainResult:
    """Run (or resume, with ``resume="auto"`` or a checkpoint tag) training."""
    import deepspeed

    rank, world_size = init_distributed()
    opt = config.train
    seed_everything(opt.seed)
    output_dir = Path(config.checkpoint.output_dir)
    ckpt_root = output_dir / "checkpoints"

    datasets, report = load_datasets(config, skip_invalid)
    if report.skipped_total and rank == 0:
        print(f"skipped {report.skipped_total} invalid record(s): {dict(report.skipped)}")
    bf16 = resolve_dtype(config.model.backbone.dtype) == torch.bfloat16
    ds_config = build_ds_config(config, world_size, bf16)
    hf_ds = None
    if zero_stage(ds_config) == 3:
        # transformers' hook: from_pretrained partitions weights while loading under ZeRO-3.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive during loading)
        if config.model.backbone.quantization is not None:
            raise ValueError("QLoRA (backbone.quantization) runs with ZeRO-2; set train.deepspeed=zero2")
    model = EmbeddingModel.build(config.model, gradient_checkpointing=opt.gradient_checkpointing)
    wrapper = PairEncoder(model)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")

    sampler = HomogeneousBatchSampler(
        [len(d.records) for d in datasets],
        [ds.weight for ds in config.data.datasets],
        opt.per_device_batch_size * world_size,
        seed=opt.seed,
        rank=rank,
        world_size=world_size,
    )
    accum = opt.gradient_accumulation_steps
    total_steps = opt.max_steps or max(1, math.ceil(opt.epochs * sampler.steps_per_epoch / accum))

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
    device = engine.device

    start_step = 0
    if resume is not None:
        tag = checkpoint.latest_tag(ckpt_root) if resume == "auto" else resume
        if tag is not None:
            start_step = checkpoint.load(engine, ckpt_root, tag, rank)
            if rank == 0:
                print(f"resumed from {ckpt_root / tag} at step {start_step}")
        elif resume != "auto":
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint in {ckpt_root}")

    collator = ContrastiveCollator(model, datasets, seed=opt.seed)
    infonce = InfoNCELoss(config.loss.temperature, config.loss.symmetric, config.loss.cross_device_negatives)
    cosent = CoSENTLoss(config.loss.cosent_scale, config.loss.cross_device_negatives)
    run_log = RunLogger(output_dir, config.logging, rank, total_steps, start_step, asdict(config))
    if rank == 0:
        (output_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))

    batches = sampler.batches(start_step * accum)
    losses: list[float] = []
    samples = tokens = real_tokens = 0
    started = time.perf_counter()
    engine.train()
    step = start_step
    while step < total_steps:
        step_loss = torch.zeros((), device=device)
        step_acc = torch.zeros((), device=device)
        step_tokens = 0
        lr = scheduler.get_last_lr()[0]  # the rate this step applies
        for _ in range(accum):
            batch = collator(next(batches))
            query, passage = _to(batch["query"], device), _to(batch["passage"], device)
            q, p = engine(query, passage)
            if batch["loss"] == "cosent":
                out = cosent(q, p, batch["scores"].to(device))
            else:
                out = infonce(q, p, batch["group_size"], batch["in_batch_negatives"])
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.detach() / accum
            step_acc += out.accuracy / accum
            step_tokens += int(query["attention_mask"].numel() + passage["attention_mask"].numel())
            real_tokens += int(query["attention_mask"].sum() + passage["attention_mask"].sum())
            samples += query["input_ids"].shape[0]
        step += 1
        tokens += step_tokens
        loss_value = all_reduce_mean(step_loss).item()
        losses.append(loss_value)
        if step % config.logging.log_every == 0 or step == total_steps:
            elapsed = max(time.perf_counter() - started, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            run_log.log(step, {
                "loss": loss_value,
                "accuracy": all_reduce_mean(step_acc).item(),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "samples_per_s": samples * world_size / elapsed,
                "tokens_per_s": tokens * world_size / elapsed,
                "padding_share": 1.0 - real_tokens / max(tokens, 1),
                "elapsed_s": elapsed,
            })
        if config.checkpoint.save_every and step % config.checkpoint.save_every == 0 and step < total_steps:
            checkpoint.save(engine, ckpt_root, step, rank, config.checkpoint.keep_last)
        if os.environ.get(CRASH_ENV) == str(step):
            # Fault injection for the resume tests: die like `kill -9` would, right here.
            os.kill(os.getpid(), signal.SIGKILL)
    elapsed = max(time.perf_counter() - started, 1e-9)
    run_log.close()

    final_dir = output_dir / "final"
    save_model(engine, model, final_dir, rank)
    if config.logging.probe_file:
        _write_probe(model, Path(config.logging.probe_file), output_dir / "probe_embeddings.json", rank)
    result = TrainResult(final_dir, step, losses, report.skipped_total, samples * world_size / elapsed,
                         tokens * world_size / elapsed)
    if rank == 0:
        summary = {
            "steps": step,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "samples_per_s": round(result.samples_per_s, 3),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "skipped_records": report.skipped_total,
            "final_model": str(final_dir),
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        width = max(len(k) for k in summary)
        print("\n".join(["training summary"] + [f"  {k:<{width}}  {v}" for k, v in summary.items()]))
    return result


def _write_probe(model: EmbeddingModel, probe: Path, out: Path, rank: int) -> None:
    """Encode the probe texts with the in-memory model. Every rank runs the forward (ZeRO-3
    gathers weights collectively); rank 0 writes."""
    texts = json.loads(probe.read_text())
    instruction = texts.get("instruction")
    with torch.no_grad():
        queries = model.encode(texts.get("queries", []), instruction=instruction, is_query=True)
        passages = model.encode(texts.get("passages", []))
    if rank == 0:
        out.write_text(json.dumps({"queries": queries.tolist(), "passages": passages.tolist(),
                                   "instruction": instruction}))


def save_model(engine, model: EmbeddingModel, folder: Path, rank: int) -> None:
    """Write the trained model folder. Under ZeRO-3 the weights are sharded: LoRA adapters and
    the pooling head are gathered to every rank first (collective), full fine-tunes are
    consolidated by DeepSpeed; only rank 0 writes."""
    import deepspeed
    import torch.distributed as dist

    from llmembed.lora import is_peft_model

    if engine.zero_optimization_stage() == 3:
        if is_peft_model(model.backbone):
            params = [p for p in model.parameters() if p.requires_grad] + list(model.pooling.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    model.save(folder)
        else:
            state = engine._zero3_consolidated_16bit_state_dict()
            if rank == 0:
                state = {k[len("model."):]: v for k, v in state.items()}
                model.save(folder, state_dict=state)
    elif rank == 0:
        model.save(folder)
    if dist.is_initialized():
        dist.barrier()

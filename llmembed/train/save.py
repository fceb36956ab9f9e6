"""What a finished run leaves behind: the model folder, the probe embeddings and the summary.

Saving is collective under ZeRO-3 (weights are sharded across ranks and must be gathered), so
every function here is called on every rank and only rank 0 writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmembed.lora import is_peft_model
from llmembed.model import EmbeddingModel


def save_model(engine: Any, model: EmbeddingModel, folder: Path, rank: int) -> None:
    """Write the trained model folder. Under ZeRO-3 the weights are sharded: LoRA adapters and
    the pooling head are gathered to every rank first (collective), full fine-tunes are
    consolidated by DeepSpeed; only rank 0 writes."""
    import deepspeed
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        if is_peft_model(model.backbone):
            params = [p for p in model.parameters() if p.requires_grad] + list(model.pooling.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    model.save(folder)
        else:
            state = engine._zero3_consolidated_16bit_state_dict()
            if rank == 0:
                # The engine wraps a PairEncoder whose only child is ``model``.
                state = {k[len("model."):]: v for k, v in state.items()}
                model.save(folder, state_dict=state)
    elif rank == 0:
        model.save(folder)
    if dist.is_initialized():
        dist.barrier()


def write_probe(model: EmbeddingModel, probe: Path, out: Path, rank: int) -> None:
    """Encode the probe texts (``{"queries", "passages", "instruction"}``) with the in-memory
    model: the reference that saved, reloaded and exported models are checked against. Every
    rank runs the forward (ZeRO-3 gathers weights collectively); rank 0 writes."""
    texts = json.loads(probe.read_text())
    instruction = texts.get("instruction")
    with torch.no_grad():
        queries = model.encode(texts.get("queries", []), instruction=instruction, is_query=True)
        passages = model.encode(texts.get("passages", []))
    if rank == 0:
        out.write_text(json.dumps({"queries": queries.tolist(), "passages": passages.tolist(),
                                   "instruction": instruction}))


def write_summary(output_dir: Path, summary: dict[str, Any], rank: int) -> None:
    """``summary.json`` plus the same table on stdout (rank 0 only)."""
    if rank != 0:
        return
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(k) for k in summary)
    print("\n".join(["training summary"] + [f"  {k:<{width}}  {v}" for k, v in summary.items()]))

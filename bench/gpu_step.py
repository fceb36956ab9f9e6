"""Training steps of a 7B-shaped embedding model on one GPU: tokens/s, peak memory, model FLOPs
utilisation, padded against packed, for each attention implementation at hand.

    python bench/gpu_step.py --pipeline-step                  # a GPU: writes bench/results/gpu_step.md
    python bench/gpu_step.py --shape tiny --device cpu --steps 3 --out /tmp/gpu_step.md   # smoke run

What runs is our training step without DeepSpeed (one device): the model is Mistral-7B's shape
(hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336, vocabulary 32768) built from a
config with random weights (nothing is downloaded), bf16, LoRA r16 on every linear layer,
non-reentrant gradient checkpointing, last-token pooling, InfoNCE over the batch with one hard
negative per query; texts are random token ids whose lengths are drawn uniformly from
``--lengths`` (default 16..256, a retrieval mix of short queries and passages). Each attention
implementation (sdpa; flash_attention_2 when flash-attn imports) runs padded and packed
(``llmembed.packing``, rows of ``--pack-tokens``).

Model FLOPs per step count the forward (2 x parameters per token, plus attention's
4 x layers x hidden x context) and the backward to the inputs (twice the forward; the frozen
weights get no gradient, the LoRA weights' are negligible), not the recomputation of
checkpointing; utilisation divides by the device's dense bf16 peak (a table below, by name).

``--pipeline-step`` also saves the random backbone (14 GB for the 7B shape, in a temporary folder
removed afterwards) and trains one step of ``launch/configs/pipeline_gpu.yaml`` on it through
``launch/train.py`` under DeepSpeed (ZeRO-3), as the GPU pipeline runs it; that part needs deepspeed.

A bare GPU machine needs only torch, transformers, peft, safetensors, numpy and pyyaml (llmembed's
core dependencies; no deepspeed, no sentence-transformers, no tokenizer package or model files:
the tokenizer is a word-level one built in memory). Bring the wheels: ``pip wheel . --no-deps -w
wheels/`` here, then ``pip install --no-deps wheels/llmembed-*.whl`` there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmembed.backbone import BackboneConfig  # noqa: E402
from llmembed.lora import LoraSettings, apply_lora  # noqa: E402
from llmembed.losses.infonce import InfoNCELoss  # noqa: E402
from llmembed.model import EmbeddingModel, EmbeddingModelConfig  # noqa: E402
from llmembed.pooling import PoolingConfig, build_pooling  # noqa: E402
from llmembed.train.step import PairEncoder  # noqa: E402

SHAPES = {
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
# Dense bf16 peak (FLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def word_tokenizer():
    """A tokenizer with an EOS and a pad token and nothing to download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "a": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                   eos_token="</s>", pad_token="<pad>")


def random_backbone(shape: str, attn: str, device: torch.device, dtype: torch.dtype):
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation=attn)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of 7B weights
    try:
        with device:
            return MistralModel(config)
    finally:
        torch.set_default_dtype(default)


def build(shape: str, attn: str, device: torch.device, dtype: torch.dtype) -> EmbeddingModel:
    backbone = random_backbone(shape, attn, device, dtype)
    config = backbone.config
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = apply_lora(backbone, LoraSettings(r=16, alpha=32, dropout=0.0))
    model_config = EmbeddingModelConfig(backbone=BackboneConfig("random", attn_implementation=attn),
                                        pooling=PoolingConfig(kind="last_token"), lora=LoraSettings(r=16, dropout=0.0))
    pooling = build_pooling(model_config.pooling, config.hidden_size).to(device)
    return EmbeddingModel(model_config, backbone, word_tokenizer(), pooling)


def batch(rows: int, lengths: tuple[int, int], vocab: int, device: torch.device, generator: torch.Generator) -> dict:
    """Left-padded random texts (last-token pooling's side) ending in EOS (id 1)."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (rows,), generator=generator)
    width = int(sizes.max())
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, size in enumerate(sizes.tolist()):
        ids[row, width - size:] = torch.randint(2, vocab, (size,), generator=generator)
        ids[row, -1] = 1
        mask[row, width - size:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def model_flops(model: EmbeddingModel, real_tokens: int, context: float) -> float:
    """Forward + backward to the inputs (3 x forward) for ``real_tokens`` of mean length ``context``."""
    config = model.base_model.config
    params = sum(p.numel() for n, p in model.backbone.named_parameters() if "embed_tokens" not in n)
    attention = 4 * config.num_hidden_layers * config.hidden_size * context
    return 3 * (2 * params + attention) * real_tokens


def run(model: EmbeddingModel, pack_tokens: int | None, args: argparse.Namespace, device: torch.device) -> dict:
    encoder = PairEncoder(model, pack_tokens=pack_tokens)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loss_fn = InfoNCELoss(0.02)
    generator = torch.Generator().manual_seed(1)
    vocab = model.base_model.config.vocab_size
    times, real, processed, lengths = [], 0, 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        query = batch(args.batch, (args.lengths[0], max(args.lengths[0], args.lengths[1] // 4)), vocab, device,
                      generator)
        passage = batch(2 * args.batch, tuple(args.lengths), vocab, device, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        encoder.processed_tokens = 0
        q, p = encoder(query, passage)
        out = loss_fn(q, p, group_size=2)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens = int(query["attention_mask"].sum() + passage["attention_mask"].sum())
            real += tokens
            processed += encoder.processed_tokens
            lengths += [float(query["attention_mask"].sum(1).float().mean()),
                        float(passage["attention_mask"].sum(1).float().mean())]
    seconds = sum(times)
    result = {"step_s": statistics.mean(times), "real_tokens_per_s": real / seconds,
              "padding": 1 - real / max(processed, 1),
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    flops = model_flops(model, real, statistics.mean(lengths)) / seconds
    result["tflops"] = flops / 1e12
    result["mfu"] = flops / peak if peak else float("nan")
    return result


def pipeline_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    """One optimizer step of the GPU recipe's config (``launch/configs/pipeline_gpu.yaml``:
    DeepSpeed ZeRO-3, bf16, LoRA r16, gradient checkpointing) on the random backbone saved to
    disk, through ``launch/train.py`` as the pipeline runs it; returns the table's line."""
    import json
    import shutil
    import subprocess
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="llmembed-gpu-step-"))
    try:
        return _pipeline_step(args, device, dtype, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a saved 7B backbone is 14 GB


def _pipeline_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, work: Path) -> str:
    import json
    import subprocess

    backbone = random_backbone(args.shape, "sdpa", device, dtype)
    backbone.save_pretrained(work / "backbone", safe_serialization=True)
    word_tokenizer().save_pretrained(work / "backbone")
    del backbone
    generator = torch.Generator().manual_seed(2)
    with open(work / "pairs.jsonl", "w") as handle:
        for _ in range(4 * args.batch):
            size = lambda: int(torch.randint(args.lengths[0], args.lengths[1] + 1, (1,), generator=generator))  # noqa: E731
            handle.write(json.dumps({"query": " ".join(["a"] * max(1, size() // 4)), "positive": " ".join(["a"] * size()),
                                     "negatives": [" ".join(["a"] * size())]}) + "\n")
    overrides = [f"model.backbone.name_or_path={work / 'backbone'}", "train.max_steps=1", "logging.log_every=1",
                 f"train.per_device_batch_size={args.batch}", f"checkpoint.output_dir={work / 'run'}",
                 f"data.datasets=[{{path: {work / 'pairs.jsonl'}, name: random, group_size: 2}}]"]
    if device.type != "cuda":  # a smoke run: CPU has no bf16 kernels worth timing
        overrides.append("model.backbone.dtype=float32")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", str(REPO / "launch" / "train.py"),
               "--config", str(REPO / "launch" / "configs" / "pipeline_gpu.yaml"),
               *(arg for o in overrides for arg in ("--set", o))]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-4000:] + result.stderr[-4000:], file=sys.stderr)
        return f"One step of `launch/configs/pipeline_gpu.yaml` on it: **failed** (exit {result.returncode}, {seconds:.0f} s)."
    row = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return (f"One step of `launch/configs/pipeline_gpu.yaml` on it (DeepSpeed ZeRO-3, launch/train.py, batch "
            f"{args.batch}): exit 0 in {seconds:.0f} s with start-up, loss {row['loss']:.4f}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8, help="queries per step (each with a positive and a negative)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--pack-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", nargs="+", default=None, help="default: sdpa, and flash_attention_2 if installed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_step.md")
    parser.add_argument("--pipeline-step", action="store_true",
                        help="also run one step of launch/configs/pipeline_gpu.yaml on the backbone (needs deepspeed)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu (with --shape tiny) for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attns = args.attn or ["sdpa"] + (["flash_attention_2"] if _has_flash_attn() else [])
    rows = []
    for attn in attns:
        model = build(args.shape, attn, device, dtype)
        model.train()
        for name, pack in (("padded", None), ("packed", args.pack_tokens)):
            result = run(model, pack, args, device)
            rows.append((attn, name, result))
            print(f"{attn:<18} {name:<7} {result['step_s']:7.3f} s/step {result['real_tokens_per_s']:9.0f} tokens/s "
                  f"padding {result['padding']:5.1%} peak {result['peak_gib']:6.1f} GiB "
                  f"{result['tflops']:7.1f} TFLOP/s MFU {result['mfu']:.1%}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [f"{args.shape} shape, random weights, {dtype}, LoRA r16, gradient checkpointing, last-token pooling, "
             f"InfoNCE; {args.batch} queries + {2 * args.batch} passages per step, lengths {args.lengths[0]}.."
             f"{args.lengths[1]}; mean of steps {args.warmup + 1}..{args.steps}; on {name}, torch {torch.__version__}. "
             f"Command: `python bench/gpu_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| attention | batches | s/step | real tokens/s | padding | peak GiB | model TFLOP/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for attn, mode, r in rows:
        lines.append(f"| {attn} | {mode} | {r['step_s']:.3f} | {r['real_tokens_per_s']:.0f} | {r['padding']:.1%} | "
                     f"{r['peak_gib']:.1f} | {r['tflops']:.1f} | {r['mfu']:.1%} |")
    if args.pipeline_step:
        lines += ["", pipeline_step(args, device, dtype)]
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"table: {args.out}")
    return 0


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())

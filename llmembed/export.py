"""Export a trained model folder as one merged checkpoint that serves unchanged.

``python -m llmembed.export --model TRAINED_DIR --out DIR [--dtype bf16]`` writes:

- merged weights (LoRA folded into the base) as safetensors, ``config.json`` carrying
  ``is_causal`` exactly as trained (vLLM and transformers both read it);
- a tokenizer whose *plain* call appends EOS when the pooling is last-token, and which has no
  chat template (sentence-transformers would otherwise wrap plain text in it);
- sentence-transformers files: ``modules.json``, the pooling module (ST's ``Pooling`` for
  last-token/mean, our :class:`llmembed.st_modules.LatentAttentionPooling` for NV-Embed),
  ``Normalize``, and the query/document prompts;
- a model card with the exact loading and serving commands.

Shipping merged weights rather than an adapter is deliberate: servers that apply LoRA on
pooling models have produced wrong vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from llmembed.backbone import dtype_name, set_bidirectional
from llmembed.lora import is_peft_model
from llmembed.model import EmbeddingModel
from llmembed.tokenization import EmbeddingTokenizer

logger = logging.getLogger("llmembed.export")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
PROBE_TEXTS = ["a", "Hello world!", "Instruct: x\nQuery: y", "  spaced   text \n", "数字 123"]


class ExportError(RuntimeError):
    pass


def export(model_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", instruction: str | None = None,
           overwrite: bool = False) -> Path:
    """Export ``model_dir`` (written by :meth:`EmbeddingModel.save`) to ``out_dir``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # Merge in fp32 so the LoRA product is added at full precision, then cast.
    model = EmbeddingModel.load(model_dir, dtype="float32", attn_implementation="sdpa", quantization=None)
    config = model.config
    bidirectional = model.bidirectional
    backbone = model.backbone.merge_and_unload() if is_peft_model(model.backbone) else model.backbone
    backbone = backbone.to(DTYPES[dtype])
    set_bidirectional(backbone, bidirectional)
    backbone.config.dtype = dtype_name(DTYPES[dtype])
    backbone.save_pretrained(out, safe_serialization=True)

    tokenizer = _serving_tokenizer(model.tokenizer, append_eos=config.appends_eos)
    tokenizer.save_pretrained(out)
    for leftover in ("chat_template.jinja", "chat_template.json"):
        (out / leftover).unlink(missing_ok=True)

    # Build the sentence-transformers pipeline with ST's own classes and let ST write its files.
    max_len = max(config.query_max_length, config.passage_max_length)
    transformer = Transformer(
        str(out),
        max_seq_length=max_len,
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
        model_kwargs={"dtype": DTYPES[dtype], "attn_implementation": "sdpa"},
    )
    width = model.pooling.hidden_size
    if config.pooling.kind == "latent_attention":
        from llmembed.st_modules import LatentAttentionPooling

        pooling = LatentAttentionPooling.from_head(model.pooling)
    else:
        mode = {"last_token": "lasttoken", "mean": "mean"}[config.pooling.kind]
        pooling = Pooling(width, pooling_mode=mode, include_prompt=config.pooling.include_instruction)
    modules = [transformer, pooling] + ([Normalize()] if config.normalize else [])
    query_prefix = config.prompts.query_prefix(instruction)
    passage_prefix = config.prompts.passage_prefix()
    prompts = {"query": query_prefix, "document": passage_prefix}
    st = SentenceTransformer(
        modules=modules,
        prompts=prompts,
        default_prompt_name="document" if passage_prefix else None,
        similarity_fn_name="cosine",
        device="cpu",
    )
    st.save(str(out), create_model_card=False)
    # ST re-saved the tokenizer from the folder; make sure nothing brought the template back.
    for leftover in ("chat_template.jinja", "chat_template.json"):
        (out / leftover).unlink(missing_ok=True)
    _check_config(out, bidirectional)
    _check_tokenizer(out, model, config.appends_eos)
    (out / "llmembed_export.json").write_text(json.dumps({
        "source": str(Path(model_dir).resolve()),
        "pooling": config.pooling.kind,
        "include_instruction": config.pooling.include_instruction,
        "normalize": config.normalize,
        "output_dim": config.output_dim,
        "is_causal": not bidirectional,
        "appends_eos": config.appends_eos,
        "dtype": dtype_name(DTYPES[dtype]),
        "prompts": prompts,
    }, indent=2))
    (out / "README.md").write_text(model_card(out, config, bidirectional, query_prefix, passage_prefix, dtype))
    logger.info("Exported %s -> %s", model_dir, out)
    return out


def _serving_tokenizer(tokenizer, append_eos: bool):
    """A copy of ``tokenizer`` whose plain call appends EOS (when asked), without chat template."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    if hasattr(tok, "init_kwargs"):
        tok.init_kwargs.pop("chat_template", None)
    probe = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = tok.bos_token_id is not None and len(probe) > 1 and probe[0] == tok.bos_token_id
    if append_eos and not (probe and probe[-1] == tok.eos_token_id):
        if not hasattr(tok, "update_post_processor"):
            raise ExportError(f"{type(tok).__name__} is not a fast tokenizer; cannot make it append EOS")
        tok.add_bos_token = adds_bos
        tok.add_eos_token = True
    return tok


def _check_config(out: Path, bidirectional: bool) -> None:
    saved = json.loads((out / "config.json").read_text())
    if saved.get("is_causal", True) is (not bidirectional) and "is_causal" in saved:
        return
    saved["is_causal"] = not bidirectional
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _check_tokenizer(out: Path, model: EmbeddingModel, append_eos: bool) -> None:
    """The exported tokenizer's plain call must give exactly our training token ids."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(out))
    ours = EmbeddingTokenizer(model.tokenizer, append_eos=append_eos)
    expected = ours.token_ids(PROBE_TEXTS, max_length=10_000)
    got = [served(t)["input_ids"] for t in PROBE_TEXTS]
    if got != expected:
        raise ExportError(f"exported tokenizer disagrees with training tokenization: {got} != {expected}")
    if served.chat_template:
        raise ExportError("exported tokenizer still carries a chat template")


def model_card(out: Path, config, bidirectional: bool, query_prefix: str, passage_prefix: str, dtype: str) -> str:
    pooling = config.pooling.kind
    name = out.name
    latent = pooling == "latent_attention"
    st_load = (
        'SentenceTransformer("{d}", trust_remote_code=True)  # loads llmembed.st_modules.LatentAttentionPooling'
        if latent else 'SentenceTransformer("{d}")'
    ).format(d=name)
    attention = "bidirectional (`is_causal: false` in config.json)" if bidirectional else "causal"
    vllm_note = (
        "vLLM cannot run the latent-attention head: serve this model with sentence-transformers "
        "or `llmembed`, not vLLM."
        if latent else
        "vLLM reads the pooling type and normalisation from `modules.json` and the attention "
        "direction from `config.json`; no extra flags are needed."
    )
    truncation = (
        f"\nEmbeddings are truncated to the first {config.output_dim} dimensions before normalising: pass "
        f"`truncate_dim={config.output_dim}` to `SentenceTransformer(...)` and `dimensions={config.output_dim}` "
        "to vLLM requests.\n" if config.output_dim else ""
    )
    exclusion = (
        "\nInstruction tokens are excluded from the pooled mean (`include_prompt: false`); vLLM's mean "
        "pooling cannot do that, so use sentence-transformers for this model.\n"
        if not config.pooling.include_instruction else ""
    )
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, llmembed]
---
# {name}

A text-embedding model exported by [llmembed](https://pypi.org/project/llmembed/): merged weights
({dtype}), {pooling.replace('_', '-')} pooling, {attention}, {"L2-normalised" if config.normalize else "unnormalised"} vectors.
{truncation}{exclusion}
## Inputs
Queries carry an instruction; passages {"carry the prefix " + repr(passage_prefix) if passage_prefix else "are embedded as they are"}.

    query:   {query_prefix!r} + text

The tokenizer appends the EOS token itself{"" if config.appends_eos else " only when the model was trained so (it was not)"},
so every server sees the same tokens as training. Change the instruction for another task by
writing the query text as `Instruct: <task>\\nQuery: <text>`.

## sentence-transformers
```python
from sentence_transformers import SentenceTransformer
model = {st_load}
q = model.encode(["how do plants make food?"], prompt_name="query")
p = model.encode(["Photosynthesis turns light, water and CO2 into sugar."])
print(model.similarity(q, p))
```

## vLLM
```bash
vllm serve {name} --runner pooling
```
```python
from vllm import LLM
llm = LLM("{name}", runner="pooling")
out = llm.embed([{query_prefix!r} + "how do plants make food?"])
```
{vllm_note}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (EmbeddingModel.save)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype of the export")
    parser.add_argument("--instruction", default=None, help="instruction baked into the 'query' prompt")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.model, args.out, args.dtype, args.instruction, args.overwrite)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

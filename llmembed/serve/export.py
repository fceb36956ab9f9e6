"""Export a trained model folder as one merged checkpoint that serves unchanged.

``python -m llmembed.serve.export --model TRAINED_DIR --out DIR [--dtype bf16]`` writes:

- merged weights (LoRA folded into the base) as safetensors, ``config.json`` carrying
  ``is_causal`` exactly as trained (vLLM and transformers both read it);
- a tokenizer whose *plain* call appends EOS when the contract says so, and which has no chat
  template (sentence-transformers would otherwise wrap plain text in it);
- sentence-transformers files: ``modules.json``, the pooling module (ST's ``Pooling`` for
  last-token/mean, our :class:`llmembed.serve.st_modules.LatentAttentionPooling` for NV-Embed),
  ``Normalize``, the query/document prompts and the serving length;
- ``llmembed_serving.json``: the model's serving contract, unchanged;
- a model card with the exact loading and serving commands.

Everything above is rendered from the one :class:`~llmembed.serving.ServingContract` read
from the trained folder; nothing is re-derived from settings elsewhere. The export then runs
:mod:`llmembed.serve.verify` on its own output (with real vLLM when ``--vllm-python`` or
``$LLMEMBED_VLLM_PYTHON`` names an interpreter that has it).

Shipping merged weights rather than an adapter is deliberate: servers that apply LoRA on
pooling models have produced wrong vectors.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from llmembed.backbone import dtype_name, set_bidirectional
from llmembed.lora import is_peft_model
from llmembed.model import EmbeddingModel, model_inputs
from llmembed.outputs import Kind, check_output, staged_folder
from llmembed.serve.verify import verify as run_verify
from llmembed.serve.verify import vllm_interpreter
from llmembed.serving import SERVING_FILE, ServingContract

logger = logging.getLogger("llmembed.serve.export")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ExportError(RuntimeError):
    pass


def export(model_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", instruction: str | None = None,
           overwrite: bool = False, verify: bool = True, vllm_python: str | None = None,
           trust_remote_code: bool = False) -> Path:
    """Export ``model_dir`` (written by :meth:`EmbeddingModel.save`) to ``out_dir``.

    ``instruction`` replaces the contract's default instruction in the exported query prompt.
    With ``verify`` the export's vectors are checked against our ``encode`` in every serving
    path (:func:`llmembed.serve.verify.verify`); a mismatch raises :class:`ExportError`.

    Nothing is deleted before everything is known to work: the checks on the folders come
    first, the export is built in a temporary sibling of ``out_dir`` and moved into place only
    when complete (and verified); ``overwrite`` replaces only a previous llmembed export.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = check_output(out_dir, inputs=model_inputs(model_dir), kind=EXPORT_KIND, overwrite=overwrite)
    vllm_python = vllm_python or os.environ.get("LLMEMBED_VLLM_PYTHON")
    if verify and vllm_python:
        vllm_interpreter(vllm_python)
    # Merge in fp32 so the LoRA product is added at full precision, then cast.
    model = EmbeddingModel.load(model_dir, trust_remote_code=trust_remote_code, dtype="float32",
                                attn_implementation="sdpa", quantization=None)
    rejected = out.parent / f"{out.name}.unverified"
    with staged_folder(out) as staging:
        report = _build(model, Path(model_dir), staging, out.name, dtype, instruction, verify, vllm_python)
        if report is not None and not report.ok:
            # Kept for inspection beside the untouched output (replacing an earlier one only).
            if rejected.exists() and not (rejected / SERVING_FILE).is_file():
                raise ExportError(f"serving parity check failed ({report.summary()}); {out} was left as it was")
            shutil.rmtree(rejected, ignore_errors=True)
            shutil.copytree(staging, rejected)
            raise ExportError(f"serving parity check failed ({report.summary()}); {out} was left as it was, the "
                              f"unverified export is in {rejected}")
    logger.info("Exported %s -> %s", model_dir, out)
    return out


def _looks_like_export(folder: Path) -> bool:
    return (folder / SERVING_FILE).is_file() and (folder / "modules.json").is_file()


EXPORT_KIND = Kind("an llmembed export", folder=True, recognise=_looks_like_export)


def _build(model: EmbeddingModel, model_dir: Path, out: Path, name: str, dtype: str, instruction: str | None,
           verify: bool, vllm_python: str | None):
    """Write the export into ``out``; return the parity report (None without ``verify``)."""
    # sentence-transformers loads slowly: only when an export is built.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Transformer

    from llmembed.serve.st_modules import st_pooling_module

    contract = model.contract
    if instruction is not None:
        from dataclasses import replace

        contract = replace(contract, prompts=replace(contract.prompts, default_instruction=instruction))
    if model.bidirectional == contract.is_causal:
        raise ExportError(f"{model_dir}: the backbone's attention disagrees with the saved contract")
    backbone = model.backbone.merge_and_unload() if is_peft_model(model.backbone) else model.backbone
    backbone = backbone.to(DTYPES[dtype])
    set_bidirectional(backbone, not contract.is_causal)
    backbone.config.dtype = dtype_name(DTYPES[dtype])
    backbone.save_pretrained(out, safe_serialization=True)

    serving_tokenizer(model.tokenizer, contract).save_pretrained(out)
    _drop_chat_template(out)

    # Build the sentence-transformers pipeline with ST's own classes and let ST write its files.
    transformer = Transformer(
        str(out),
        max_seq_length=contract.max_length,
        # Plain text, never the chat template (ST would otherwise render text as a message).
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
        model_kwargs={"dtype": DTYPES[dtype], "attn_implementation": "sdpa"},
    )
    pooling = st_pooling_module(model.pooling)
    modules = [transformer, pooling] + ([Normalize()] if contract.normalize else [])
    st = SentenceTransformer(
        modules=modules,
        prompts={"query": contract.query_prefix(), "document": contract.passage_prefix()},
        default_prompt_name="document" if contract.passage_prefix() else None,
        similarity_fn_name="cosine",
        device="cpu",
    )
    st.save(str(out), create_model_card=False)
    _drop_chat_template(out)  # ST re-saved the tokenizer from the folder
    _write_max_seq_length(out, contract.max_length)
    _check_config(out, contract)
    contract.save(out)
    (out / "README.md").write_text(model_card(name, contract, dtype))
    if not verify:
        return None
    report = run_verify(out, vllm_python=vllm_python, reference=model)
    report.export_dir = out.parent / name
    print(report.table())
    return report




def serving_tokenizer(tokenizer, contract: ServingContract):
    """A copy of ``tokenizer`` for servers: its plain call appends EOS when the contract does,
    it pads on the contract's side, and it has no chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    if hasattr(tok, "init_kwargs"):
        tok.init_kwargs.pop("chat_template", None)
    tok.padding_side = contract.padding_side
    tok.model_max_length = contract.max_length
    probe = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = tok.bos_token_id is not None and len(probe) > 1 and probe[0] == tok.bos_token_id
    if contract.append_eos and not (probe and probe[-1] == tok.eos_token_id):
        if not hasattr(tok, "update_post_processor"):
            raise ExportError(f"{type(tok).__name__} is not a fast tokenizer; cannot make it append EOS")
        tok.add_bos_token = adds_bos
        tok.add_eos_token = True
    return tok


def _drop_chat_template(out: Path) -> None:
    for leftover in ("chat_template.jinja", "chat_template.json"):
        (out / leftover).unlink(missing_ok=True)


def _write_max_seq_length(out: Path, max_length: int) -> None:
    """sentence-transformers 6 keeps its length in the tokenizer's ``model_max_length``; vLLM
    takes its ``max_model_len`` from ``sentence_bert_config.json``'s ``max_seq_length`` only
    (otherwise from the backbone's position limit, and then embeds past our length). Writing
    both keeps them equal; ST accepts the key as its constructor argument."""
    path = out / "sentence_bert_config.json"
    config = json.loads(path.read_text())
    config["max_seq_length"] = max_length
    path.write_text(json.dumps(config, indent=2) + "\n")


def _check_config(out: Path, contract: ServingContract) -> None:
    """``is_causal`` must be written explicitly: vLLM and transformers read it from here; so
    must the Matryoshka widths, without which vLLM refuses requests for ``dimensions``."""
    saved = json.loads((out / "config.json").read_text())
    wanted = {"is_causal": contract.is_causal}
    if contract.matryoshka_dims:
        wanted["matryoshka_dimensions"] = sorted(contract.matryoshka_dims)
    if all(saved.get(key) == value and type(saved.get(key)) is type(value) for key, value in wanted.items()):
        return
    saved.update(wanted)
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def model_card(name: str, contract: ServingContract, dtype: str) -> str:
    pooling = contract.pooling.kind
    own_module = contract.st_pooling_mode() is None  # our ST module: sentence-transformers must import it
    query_prefix, passage_prefix = contract.query_prefix(), contract.passage_prefix()
    st_load = (
        f'SentenceTransformer("{name}", trust_remote_code=True)  # imports its pooling module from llmembed.serve.st_modules'
        if own_module else f'SentenceTransformer("{name}")'
    )
    attention = "causal" if contract.is_causal else "bidirectional (`is_causal: false` in config.json)"
    unsupported = contract.vllm_unsupported()
    vllm_note = (
        f"vLLM cannot serve this model ({unsupported}): use sentence-transformers or `llmembed`."
        if unsupported else
        "vLLM reads the pooling type and normalisation from `modules.json`, the serving length from "
        "`sentence_bert_config.json` and the attention direction from `config.json`; no extra flags are needed. "
        "Ask it to cut longer texts the way sentence-transformers does with `truncate_prompt_tokens=-1` "
        "(offline: `tokenization_kwargs={\"truncate_prompt_tokens\": -1}`); without it vLLM refuses them."
    )
    truncation = (
        f"\nEmbeddings are truncated to the first {contract.output_dim} dimensions before normalising: pass "
        f"`truncate_dim={contract.output_dim}` to `SentenceTransformer(...)` and `dimensions={contract.output_dim}` "
        "to vLLM requests.\n" if contract.output_dim else ""
    )
    if contract.matryoshka_dims:
        widths = ", ".join(map(str, sorted(contract.matryoshka_dims)))
        smallest = min(contract.matryoshka_dims)
        truncation += (
            f"\nTrained with a Matryoshka loss at widths {widths}: a prefix of one of those widths is a usable "
            f"embedding. Ask for one with `SentenceTransformer(..., truncate_dim={smallest})`, "
            f"`dimensions={smallest}` in vLLM requests (`matryoshka_dimensions` in `config.json`), or "
            f"`encode(..., dim={smallest})` in llmembed.\n")
    normalised = "L2-normalised" if contract.normalize else "unnormalised"
    # Say the dtype: vLLM's "auto" runs an fp32 checkpoint in fp16 on CPU.
    served_dtype = dtype_name(DTYPES[dtype])
    eos = ("The tokenizer appends the EOS token itself, so every server sees the same tokens as training."
           if contract.append_eos else "No EOS token is appended (the model was trained without one).")
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, llmembed]
---
# {name}

A text-embedding model exported by [llmembed](https://pypi.org/project/llmembed/): merged weights
({dtype}), {pooling.replace('_', '-')} pooling, {attention}, {normalised} vectors. Inputs longer than
{contract.max_length} tokens are cut at the end (the EOS token is kept). The serving facts are in
`llmembed_serving.json`; `python -m llmembed.serve.verify {name}` checks that every serving path agrees.
{truncation}
## Inputs
Queries carry an instruction; passages {"carry the prefix " + repr(passage_prefix) if passage_prefix else "are embedded as they are"}.

    query:   {query_prefix!r} + text

{eos} Change the instruction for another task by writing the query text as
`Instruct: <task>\\nQuery: <text>`.

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
vllm serve {name} --runner pooling --dtype {served_dtype}
```
```python
from vllm import LLM
llm = LLM("{name}", runner="pooling", dtype="{served_dtype}")
out = llm.embed([{query_prefix!r} + "how do plants make food?"], tokenization_kwargs={{"truncate_prompt_tokens": -1}})
```
{vllm_note}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.serve.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (EmbeddingModel.save)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype of the export")
    parser.add_argument("--instruction", default=None, help="instruction baked into the 'query' prompt")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--vllm-python", default=None,
                        help="python of an environment with vLLM: the parity check then runs real vLLM too "
                             "(default: $LLMEMBED_VLLM_PYTHON)")
    parser.add_argument("--no-verify", action="store_true", help="skip the serving parity check")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose backbone or tokenizer runs code from its own files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.model, args.out, args.dtype, args.instruction, args.overwrite,
                     verify=not args.no_verify, vllm_python=args.vllm_python,
                     trust_remote_code=args.trust_remote_code)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

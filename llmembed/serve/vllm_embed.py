"""Embed texts with real vLLM (``runner="pooling"``); runs inside a vLLM environment.

    VLLM_PYTHON llmembed/serve/vllm_embed.py EXPORT_DIR IN.json OUT.json [--dtype auto] [--hf-overrides JSON]
                                       [--dimensions 16,64]

``IN.json`` is a list of strings (prompts already applied); ``OUT.json`` receives the vectors,
the token count of each prompt, and what vLLM read from the export (attention direction,
dtype, max length). Only vLLM and the standard library are imported, so this file runs by path
in an environment where llmembed is not installed (vLLM pins its own torch and transformers).
Texts longer than the served maximum are cut from the end (``truncate_prompt_tokens=-1``, the
pooling runner's right-side truncation), as sentence-transformers cuts them. ``--dimensions``
embeds the texts again at each listed Matryoshka width through vLLM's own ``dimensions``
pooling parameter (allowed only where the export's config.json lists ``matryoshka_dimensions``).
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("output")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--hf-overrides", default=None)
    parser.add_argument("--dimensions", default="", help="comma-separated Matryoshka widths")
    args = parser.parse_args()

    from vllm import LLM, PoolingParams

    kwargs = {"hf_overrides": json.loads(args.hf_overrides)} if args.hf_overrides else {}
    llm = LLM(model=args.model, runner="pooling", dtype=args.dtype, enforce_eager=True, seed=0, **kwargs)
    with open(args.inputs, encoding="utf-8") as handle:
        texts = json.load(handle)
    truncation = {"truncate_prompt_tokens": -1}
    outputs = llm.embed(texts, use_tqdm=False, tokenization_kwargs=truncation)
    by_dimensions = {}
    for width in filter(None, args.dimensions.split(",")):
        cut = llm.embed(texts, use_tqdm=False, tokenization_kwargs=truncation,
                        pooling_params=PoolingParams(dimensions=int(width)))
        by_dimensions[width] = [o.outputs.embedding for o in cut]
    config = llm.llm_engine.model_config
    result = {
        "embeddings": [o.outputs.embedding for o in outputs],
        "token_counts": [len(o.prompt_token_ids) for o in outputs],
        "by_dimensions": by_dimensions,
        "is_causal": getattr(config.hf_config, "is_causal", None),
        "dtype": str(config.dtype).replace("torch.", ""),
        "max_model_len": config.max_model_len,
    }
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()

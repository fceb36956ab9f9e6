"""``python -m synth.generate --out DIR [options]``: E5-mistral-style synthetic data.

Runs out of the box on CPU with the built-in SmolLM2-135M-Instruct and the transformers
backend; use ``--backend vllm`` on GPUs or ``--backend openai --base-url URL`` for a server.
With ``--corpus docs.jsonl`` it writes queries for the passages of your own corpus instead of
inventing both sides (``synth.grounded``); ``python -m synth.relabel`` then lets the LLM pick
each query's positive. Rerun the same command after a crash to continue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from llmembed.argtypes import float_in, int_at_least
from synth.backends import BackendError, create_backend
from synth.grounded import GroundedPipeline, file_sha256, token_cutter
from synth.pipeline import Settings, Pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m synth.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (shards, raw generations, manifest)")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"])
    p.add_argument("--model", default="default", help="'default' (packaged SmolLM2), a folder or a model id")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--num-tasks", type=int_at_least(1), default=4, help="task definitions per category (brainstormed)")
    p.add_argument("--examples-per-task", type=int_at_least(1), default=2)
    p.add_argument("--categories", nargs="*", default=[], help="subset of the taxonomy's categories")
    p.add_argument("--languages", nargs="*", default=[], help="subset of languages (default: weighted list)")
    p.add_argument("--taxonomy", help="YAML taxonomy to use instead of the built-in one")
    p.add_argument("--tasks-file", help='JSON {"category": ["task definition", ...]} used instead of brainstorming')
    corpus = p.add_argument_group("corpus mode (queries grounded in your passages; see synth.grounded)")
    corpus.add_argument("--corpus", help='JSONL of passages: {"text"} or {"id", "text"} lines')
    corpus.add_argument("--queries-per-passage", type=int_at_least(1), default=1)
    corpus.add_argument("--query-kinds", nargs="*", default=[],
                        help="kinds of query to write (default: all of the kinds file: question keywords claim title)")
    corpus.add_argument("--query-kinds-file", help="YAML of query kinds instead of the built-in synth/query_kinds.yaml")
    corpus.add_argument("--prompt-form", choices=["fewshot", "chat"], default="fewshot",
                        help="fewshot: completion prompt (small and base models); chat: JSON task + query (instruct models)")
    corpus.add_argument("--passage-max-tokens", type=int_at_least(1), default=256,
                        help="passages are cut to this many tokens of the generator's tokenizer")
    corpus.add_argument("--max-passages", type=int_at_least(1), help="a seeded sample of this many passages")
    corpus.add_argument("--instruction", help="task instruction of every record (default: the kind's, or the LLM's in chat form)")
    p.add_argument("--decontaminate", help="text file of evaluation texts (one per line) to keep out")
    p.add_argument("--max-field-chars", type=int_at_least(1), help="cap every generated string field at this many characters")
    p.add_argument("--temperature", type=float_in(0.0), default=1.0)
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--max-tokens", type=int_at_least(1), default=512)
    p.add_argument("--max-attempts", type=int_at_least(1), default=3, help="tries per example when a generation fails to parse")
    p.add_argument("--shard-size", type=int_at_least(1), default=64, help="examples per output shard (the unit of resume)")
    p.add_argument("--num-shards", type=int_at_least(1), default=1, help="data-parallel processes over the work items")
    p.add_argument("--shard-index", type=int_at_least(0), default=0, help="this process's index in 0..num-shards-1")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="transformers backend: prompts per generate call")
    p.add_argument("--no-constrained", action="store_true", help="transformers backend: no JSON-schema decoding")
    p.add_argument("--tensor-parallel-size", type=int_at_least(1), default=1, help="vllm backend")
    p.add_argument("--dtype", default="auto", help="vllm/transformers dtype")
    p.add_argument("--enforce-eager", action="store_true", help="vllm backend: no CUDA graphs / compilation")
    p.add_argument("--max-model-len", type=int_at_least(16), default=4096, help="vllm backend")
    p.add_argument("--base-url", help="openai backend: e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai backend: env var holding the key")
    p.add_argument("--concurrency", type=int_at_least(1), default=8, help="openai backend: requests in flight")
    p.add_argument("--max-retries", type=int_at_least(0), default=5,
                   help="openai backend: retries per request (the client's exponential backoff with jitter)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.shard_index < args.num_shards:
        p.error("--shard-index must be in 0..num-shards-1")
    if args.backend == "openai" and not args.base_url:
        p.error("--backend openai needs --base-url")
    return args


def decoding_settings(args: argparse.Namespace) -> dict:
    """The backend options that change the generated text, recorded in the run key. The
    transformers backend seeds each generate call from its batch, so the batch size counts;
    an OpenAI server's own settings are outside our reach."""
    if args.backend == "transformers":
        return {"constrained": not args.no_constrained, "dtype": args.dtype, "batch_size": args.batch_size}
    if args.backend == "vllm":
        return {"dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size,
                "max_model_len": args.max_model_len}
    return {}


def backend_factory(args: argparse.Namespace):
    def make():
        if args.backend == "transformers":
            return create_backend("transformers", model=args.model, batch_size=args.batch_size,
                                  constrained=not args.no_constrained, dtype=args.dtype)
        if args.backend == "vllm":
            return create_backend("vllm", model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                                  seed=args.seed, dtype=args.dtype, enforce_eager=args.enforce_eager,
                                  max_model_len=args.max_model_len)
        return create_backend("openai", model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
                              concurrency=args.concurrency, max_retries=args.max_retries)

    return make


def summary_table(manifest: dict) -> str:
    totals = manifest["totals"]
    lines = [f"{'kind' if manifest['run_key'].get('corpus') else 'category':<14}{'generated':>10}{'accepted':>10}"]
    for cat in manifest["categories"]:
        lines.append(f"{cat:<14}{totals['generated_by_category'].get(cat, 0):>10}"
                     f"{totals['accepted_by_category'].get(cat, 0):>10}")
    lines.append(f"{'total':<14}{totals['generated']:>10}{totals['accepted']:>10}")
    lines.append("")
    lines.append(f"{'rejected because':<30}{'count':>6}")
    for reason, count in sorted(totals["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{reason:<30}{count:>6}")
    lines.append(f"{'total rejected':<30}{totals['rejected']:>6}")
    lines.append(f"\ntokens in {totals['tokens_in']}, out {totals['tokens_out']}, "
                 f"{totals['attempts']} requests, {totals['wall_time_s']} s generating")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The OpenAI client logs each retry (and its delay) at INFO; show them, so a wait on a
    # starting server is visible. It logs nothing else at INFO and filters auth headers.
    logging.getLogger("openai._base_client").setLevel(logging.INFO)
    settings = Settings(
        out=args.out, model=args.model, backend=args.backend, seed=args.seed, num_tasks=args.num_tasks,
        examples_per_task=args.examples_per_task, categories=args.categories, languages=args.languages,
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, max_attempts=args.max_attempts,
        shard_size=args.shard_size, num_shards=args.num_shards, shard_index=args.shard_index,
        taxonomy=args.taxonomy, tasks_file=args.tasks_file, decontaminate=args.decontaminate,
        max_field_chars=args.max_field_chars, decoding=decoding_settings(args),
    )
    try:
        if args.corpus:
            if not Path(args.corpus).is_file():
                raise FileNotFoundError(f"--corpus {args.corpus}: no such file")
            settings = replace(settings, corpus=args.corpus, corpus_sha256=file_sha256(args.corpus),
                               queries_per_passage=args.queries_per_passage, query_kinds=args.query_kinds,
                               query_kinds_file=args.query_kinds_file, prompt_form=args.prompt_form,
                               passage_max_tokens=args.passage_max_tokens, max_passages=args.max_passages,
                               instruction=args.instruction)
            pipeline = GroundedPipeline(settings, backend_factory(args),
                                        cut=token_cutter(args.model, args.passage_max_tokens))
        else:
            pipeline = Pipeline(settings, backend_factory(args))
        manifest = pipeline.run(progress=not args.no_progress)
    except (BackendError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    print(f"\nrecords in {args.out}/shards, manifest {pipeline.manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

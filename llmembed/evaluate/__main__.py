"""``python -m llmembed.evaluate --model DIR --data heldout.jsonl [--baseline]``

Prints retrieval scores of a trained model folder; ``--baseline`` also scores the same
configuration before training (fresh pooling head, no adapter) for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from llmembed.data import DataError, read_jsonl
from llmembed.evaluate.retrieval import evaluate_retrieval
from llmembed.model import EmbeddingModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.evaluate")
    parser.add_argument("--model", required=True, help="trained model folder")
    parser.add_argument("--data", required=True, help="held-out JSONL (records schema)")
    parser.add_argument("--baseline", action="store_true", help="also score the untrained configuration")
    parser.add_argument("--json", help="write the scores here")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose backbone or tokenizer runs code from its own files")
    args = parser.parse_args(argv)
    try:
        # Inputs first (seconds), the model after (longer): a wrong path never waits on a load.
        records = read_jsonl(args.data)
        if not records:
            raise DataError(f"{args.data}: no records to evaluate")
        if args.json and not Path(args.json).absolute().parent.is_dir():
            raise FileNotFoundError(f"--json {args.json}: no such folder {Path(args.json).parent}")
        model = EmbeddingModel.load(args.model, trust_remote_code=args.trust_remote_code)
        results = {"trained": evaluate_retrieval(model, records)}
        if args.baseline:
            base = EmbeddingModel.build(replace(model.config, lora=None))
            results = {"untrained": evaluate_retrieval(base, records), **results}
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(len(k) for k in results)
    for name, scores in results.items():
        print(f"{name:<{width}}  {scores.row()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: vars(v) for k, v in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

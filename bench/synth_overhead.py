"""Pipeline overhead of synth: the same prompts through the backend alone and through synth.

    .venv/bin/python bench/synth_overhead.py [--model default] [--items 16] [--max-tokens 256]

Uses the symmetric categories (no brainstorm step), so both paths send exactly the same
requests; synth adds prompt building, parsing, filtering, storage and the manifest. Retries
for unparseable generations are switched off (--max-attempts 1) so the work is identical.
Target: synth adds under 5%.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from synth.backends import create_backend
from synth.pipeline import Pipeline, Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    backend = create_backend("transformers", model=args.model, batch_size=args.batch_size)
    per_category = max(1, math.ceil(args.items / 2))
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        settings = Settings(out=f"{tmp}/out", model=args.model, seed=1, num_tasks=per_category, examples_per_task=1,
                            categories=["sts", "bitext"], max_tokens=args.max_tokens, max_attempts=1,
                            shard_size=args.batch_size * 4)
        pipeline = Pipeline(settings, lambda: backend)
        items = pipeline.items({})
        requests = [pipeline._request(item, 0) for item in items]
        # Warm-up: grammar compilation and first-call costs are paid once for both paths.
        backend.generate(requests[: args.batch_size])

        start = time.perf_counter()
        raw = []
        for i in range(0, len(requests), settings.shard_size):
            raw += backend.generate(requests[i : i + settings.shard_size])
        raw_s = time.perf_counter() - start
        raw_tokens = sum(g.tokens_out for g in raw)

        start = time.perf_counter()
        manifest = pipeline.run(progress=False)
        synth_s = time.perf_counter() - start
        totals = manifest["totals"]

    print(f"{'path':<10}{'requests':>9}{'seconds':>9}{'records/s':>11}{'tokens/s':>10}")
    print(f"{'backend':<10}{len(requests):>9}{raw_s:>9.2f}{len(requests) / raw_s:>11.2f}{raw_tokens / raw_s:>10.1f}")
    print(f"{'synth':<10}{totals['attempts']:>9}{synth_s:>9.2f}{totals['generated'] / synth_s:>11.2f}"
          f"{totals['tokens_out'] / synth_s:>10.1f}")
    print(f"\nsynth overhead: {100 * (synth_s - raw_s) / raw_s:+.1f}% wall time "
          f"(accepted {totals['accepted']} of {totals['generated']}; tokens out {totals['tokens_out']} vs {raw_tokens})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

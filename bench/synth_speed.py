"""Corpus-mode generation and relabelling against the backend's raw batched calls, on the same prompts.

    .venv/bin/python bench/synth_speed.py [--passages 64] [--rounds 2]

Generation: ``GroundedPipeline.run_shard`` (prompt building, the transformers backend's batched
``generate``, parsing, checks, duplicate removal, the shard written to disk) against a bare
``model.generate`` over the same few-shot prompts with the same sampling settings, batch size
and stop string. Scoring: ``Judge.score`` (query likelihood, the vocabulary projection only at
the query's positions) against a bare batched forward of the same token sequences that computes
every position's logits, as a plain ``model(**batch).logits`` does. Both sides run interleaved,
``--rounds`` times, on the default model, in one process; results go to
``bench/results/synth_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    from llmembed.data.packaged import chatterbot_pairs, split
    from synth.backends import create_backend
    from synth.grounded import GroundedPipeline
    from synth.pipeline import Settings
    from synth.judge import Judge

    train, _ = split(chatterbot_pairs())
    tmp = Path(tempfile.mkdtemp(prefix="synth-speed-"))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"a{n}", "text": r["positive"]}) + "\n"
                              for n, r in enumerate(train[: args.passages])))
    backend = create_backend("transformers", model="default", batch_size=args.batch_size, constrained=False,
                             dtype="float32")
    tok, lm = backend.tokenizer, backend.lm
    rows = []

    def pipeline(round_: int) -> GroundedPipeline:
        settings = Settings(out=str(tmp / f"out{round_}"), corpus=str(corpus), query_kinds=["question"],
                            temperature=0.7, max_tokens=40, shard_size=10_000, seed=round_)
        return GroundedPipeline(settings, lambda: backend)

    gen_ours, gen_raw, accepted = [], [], []
    for round_ in range(args.rounds):
        pipe = pipeline(round_)
        items = pipe.items({})
        started = time.perf_counter()
        stats = pipe.run_shard(0, items, pipe.record_filter())
        gen_ours.append(len(items) / (time.perf_counter() - started))
        accepted.append(stats["accepted"] / len(items))
        prompts = [pipe._request(it, 0).prompt for it in items]
        started = time.perf_counter()
        with torch.no_grad():
            tok.padding_side = "left"
            for s in range(0, len(prompts), args.batch_size):
                enc = tok(prompts[s : s + args.batch_size], return_tensors="pt", padding=True)
                lm.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=40,
                            pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
        gen_raw.append(len(items) / (time.perf_counter() - started))

    # Scoring: each generated query against its passage and 5 others (the relabel workload).
    records = [json.loads(l) for l in (tmp / "out0" / "shards" / "part000of001-00000.jsonl").read_text().splitlines()]
    texts = [r["positive"] for r in records]
    pairs = [(r["query"], texts[(n + k) % len(texts)], "Question") for n, r in enumerate(records) for k in range(6)]
    judge = Judge(backend, relevance=False)
    score_ours, score_raw = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        judge.score(pairs)
        score_ours.append(len(pairs) / (time.perf_counter() - started))
        sequences = sorted((r.context_ids + r.target_ids for q, p_, label in pairs for r in judge.requests(q, p_, label)),
                           key=len)
        started = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(sequences), args.batch_size):
                batch = sequences[s : s + args.batch_size]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), tok.pad_token_id)
                mask = torch.zeros_like(ids)
                for i, seq in enumerate(batch):
                    ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
                torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), -1)
        score_raw.append(len(pairs) / (time.perf_counter() - started))

    def cell(values: list[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    rows.append(("generation (records/s)", cell(gen_ours), cell(gen_raw), sum(gen_ours) / sum(gen_raw)))
    rows.append(("query-likelihood scoring (pairs/s)", cell(score_ours), cell(score_raw), sum(score_ours) / sum(score_raw)))
    lines = ["# Corpus-mode synth speed (default model, CPU)", "",
             f"Command: `.venv/bin/python bench/synth_speed.py --passages {args.passages} --rounds {args.rounds}` "
             f"(batch {args.batch_size}, {torch.get_num_threads()} threads; rounds interleaved, ours first).", "",
             "| work | ours (per round) | raw batched call (per round) | ours / raw |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {ratio:.2f}x |" for name, a, b, ratio in rows]
    lines += ["", f"Accepted share of generated queries (text checks): {cell(accepted)}.", ""]
    (REPO / "bench" / "results" / "synth_speed.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

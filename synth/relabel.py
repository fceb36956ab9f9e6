"""``python -m synth.relabel --input SYNTH_DIR --embedder M --out relabelled.jsonl``

The LLM chooses each generated query's positive (Gecko, Lee et al., 2024, arXiv 2403.20327), and
queries that do not find their way back to their own passage are dropped (Promptagator's
round-trip consistency, Dai et al., 2022).

1. Candidates: the seed passage the query was written for, plus the ``--candidates`` nearest
   passages of the corpus under an embedder (any sentence-transformers folder or our model;
   ``llmembed.mine``'s exact faiss search).
2. The generator LLM scores every candidate twice: query likelihood, the mean log-probability
   of the query's tokens given the passage (one forward pass; prompt log-probabilities in vLLM),
   and, with ``--relevance``, a yes/no relevance judgement, the log-odds of " Yes" over
   " No" after a question asking whether the passage answers the query.
3. The two rankings are fused by reciprocal rank (``1 / (k + rank)`` summed). The fused top is
   the positive, often not the seed (the count is in the stats); hard negatives come from the
   fused ranks from ``--negative-start`` on, never the seed.
4. Round trip: a query whose seed passage is not within the fused top ``--round-trip-k`` is
   dropped (reason ``seed_outside_judge_top_k``): the judge does not see in the passage what the
   generator saw, so the query is unanswerable from it, junk or generic.

The LLM's query-likelihood scores are kept in ``meta.relabel`` (``positive_score``,
``negative_scores``), which the trainer distils with ``teacher_scores: llm``. Scores and
embeddings are cached on disk in chunks, so a killed run, rerun, scores nothing twice and
writes the same output. Counts go to ``OUT.stats.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmembed.argtypes import int_at_least
from llmembed.data import DataError
from llmembed.data.readers import json_lines
from llmembed.mine import EmbeddingCache, build_index
from llmembed.outputs import Kind, any_json_with, check_output, staged_file, write_text
from llmembed.serve.encoders import EncoderError, folder_fingerprint, load_encoder
from synth.backends import Backend, BackendError, create_backend
from synth.backends.base import model_path
from synth.grounded import Passage, load_query_kinds, read_passages
from synth.judge import DEFAULT_LABEL, LIKELIHOOD_CONTEXT, NO, RELEVANCE_CONTEXT, YES, Judge, fused_order
from synth.pipeline import PASSAGES_FILE

logger = logging.getLogger("synth.relabel")
@dataclass
class RelabelSettings:
    candidates: int = 5  # nearest passages under the embedder, besides the seed
    # Also the yes/no judgement (a second forward pass per pair). Off by default: the default
    # 135M judge's yes/no odds do not track relevance (on the planted test set of
    # tests/test_relabel.py it ranked chit-chat first for an unrelated question); worth it with
    # a larger instruct model.
    relevance: bool = False
    rrf_k: int = 60
    round_trip_k: int = 2
    negatives: int = 1
    negative_start: int = 2  # the fused rank (0 = the positive) hard negatives start from
    chunk_size: int = 512  # (query, passage) pairs per cached chunk of scores

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.round_trip_k < 1 or self.negatives < 0 or self.negative_start < 1:
            raise ValueError("relabel: candidates and round_trip_k must be >= 1, negatives >= 0, "
                             "negative_start >= 1")


@dataclass
class RelabelReport:
    queries_in: int = 0
    queries_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    positive_moved: int = 0
    seed_retrieved: int = 0  # the embedder found the seed among its candidates
    pairs_scored: int = 0
    pairs_from_cache: int = 0

    def to_json(self) -> dict[str, Any]:
        kept = max(self.queries_out, 1)
        return {"queries_in": self.queries_in, "queries_out": self.queries_out,
                "kept_share": round(self.queries_out / max(self.queries_in, 1), 4), "dropped": dict(self.dropped),
                "positive_moved": self.positive_moved, "positive_moved_share": round(self.positive_moved / kept, 4),
                "seed_retrieved": self.seed_retrieved, "pairs_scored": self.pairs_scored,
                "pairs_from_cache": self.pairs_from_cache}


def relabel(records: list[dict], passages: list[Passage], encoder, judge: Judge, settings: RelabelSettings,
            cache_dir: Path | None, progress: bool = False, judge_fingerprint: str = "",
            labels: dict[str, str] | None = None) -> tuple[list[dict], RelabelReport]:
    """Relabelled copies of ``records`` (corpus-mode synth records: ``meta.passage_id`` names
    the seed) and the counts; see the module docstring."""
    report = RelabelReport(queries_in=len(records))
    by_id = {p.id: n for n, p in enumerate(passages)}
    texts = [p.text for p in passages]
    labels = labels or {}
    passage_vectors = EmbeddingCache(cache_dir, encoder.fingerprint, "passages", texts, 4096).embeddings(
        lambda t: encoder.encode_passages(t, progress))
    keys = [json.dumps([r.get("instruction"), r["query"]], ensure_ascii=False) for r in records]
    unique = list(dict.fromkeys(keys))

    def encode_queries(chunk: list[str]) -> np.ndarray:
        pairs = [json.loads(k) for k in chunk]
        return encoder.encode_queries([q for _, q in pairs], [i for i, _ in pairs], progress)

    query_vectors = EmbeddingCache(cache_dir, encoder.fingerprint, "queries", unique, 4096).embeddings(
        encode_queries)
    row = {k: n for n, k in enumerate(unique)}
    depth = min(len(passages), settings.candidates + 1)
    _, ids = build_index(passage_vectors, "flat").search(query_vectors, depth)

    candidates: list[list[int]] = []
    for number, (record, key) in enumerate(zip(records, keys)):
        seed_id = (record.get("meta") or {}).get("passage_id")
        if seed_id is None or str(seed_id) not in by_id:
            raise DataError(f"record {number + 1} (query {record['query'][:40]!r}): meta.passage_id "
                            f"{seed_id!r} is not a passage of the corpus; relabel reads corpus-mode synth output")
        seed = by_id[str(seed_id)]
        retrieved = [int(i) for i in ids[row[key]] if i >= 0 and int(i) != seed][: settings.candidates]
        if seed in ids[row[key]][: settings.candidates]:
            report.seed_retrieved += 1
        candidates.append([seed, *retrieved])

    def label_of(record: dict) -> str:
        return labels.get((record.get("meta") or {}).get("kind"), DEFAULT_LABEL)

    pairs: dict[str, int] = {}
    for record, cands in zip(records, candidates):
        for c in cands:
            pairs.setdefault(json.dumps([label_of(record), record["query"], texts[c]], ensure_ascii=False), len(pairs))
    pair_keys = list(pairs)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pair_keys), desc="relabel", unit="pair", disable=not progress)

    def judge_chunk(chunk: list[str]) -> np.ndarray:
        scores = judge.score([(q, p, label) for label, q, p in map(json.loads, chunk)])
        bar.update(len(chunk))
        return scores

    cache = EmbeddingCache(cache_dir, judge_fingerprint, "judge", pair_keys, settings.chunk_size)
    scores = cache.embeddings(judge_chunk)
    bar.close()
    report.pairs_scored, report.pairs_from_cache = cache.encoded, cache.from_cache

    out: list[dict] = []
    for record, cands in zip(records, candidates):
        rows = [scores[pairs[json.dumps([label_of(record), record["query"], texts[c]], ensure_ascii=False)]]
                for c in cands]
        likelihood = [float(r[0]) for r in rows]
        relevance = [float(r[1]) for r in rows] if judge.relevance else None
        order = fused_order(likelihood, relevance, settings.rrf_k)
        seed_rank = order.index(0)
        if seed_rank >= settings.round_trip_k:
            report.dropped["seed_outside_judge_top_k"] += 1
            continue
        best = order[0]
        negatives = [i for i in order[settings.negative_start :] if i != 0][: settings.negatives]
        moved = best != 0
        report.positive_moved += moved
        meta = dict(record.get("meta") or {})
        meta["relabel"] = {
            "seed_passage_id": passages[cands[0]].id, "positive_passage_id": passages[cands[best]].id,
            "positive_moved": moved, "seed_rank": seed_rank,
            "candidates": [passages[c].id for c in cands], "likelihood": likelihood, "relevance": relevance,
            "fused_order": order,
            # What teacher_scores: llm distils (the query likelihood of each candidate kept).
            "positive_score": likelihood[best], "negative_scores": [likelihood[i] for i in negatives],
        }
        out.append({**record, "positive": texts[cands[best]], "negatives": [texts[cands[i]] for i in negatives],
                    "meta": meta})
    report.queries_out = len(out)
    return out, report


def read_synth_records(path: Path) -> tuple[list[dict], Path | None]:
    """Records of a synth output folder (every finished shard, in order) and its passages
    file; or of one JSONL file (and no passages file)."""
    files = sorted((path / "shards").glob("*.jsonl")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise DataError(f"{path}: no shards (is it a synth output folder?)")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    records = []
    for file in files:
        for number, record in json_lines(file):
            if not isinstance(record, dict) or not isinstance(record.get("query"), str):
                raise DataError(f"{file}:{number}: field 'query': expected a record with a query string")
            records.append(record)
    passages = path / PASSAGES_FILE if path.is_dir() else None
    return records, passages if passages is not None and passages.is_file() else None


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


RELABELLED_KIND = Kind("records written by synth.relabel (no OUT.stats.json beside it)", folder=False,
                       recognise=lambda path: any_json_with("queries_in", "judge")(stats_path(path)))
STATS_KIND = Kind("relabelling counts", folder=False, recognise=any_json_with("queries_in", "judge"))
CACHE_KIND = Kind("a relabelling cache", folder=True, recognise=lambda path: True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m synth.relabel", description=__doc__.split("\n\n")[1])
    p.add_argument("--input", required=True, help="a corpus-mode synth output folder, or a JSONL of its records")
    p.add_argument("--corpus", help="the passages (default: the synth folder's passages.jsonl)")
    p.add_argument("--embedder", required=True, help="retrieves the candidates: our model or a sentence-transformers folder")
    p.add_argument("--out", required=True, help="relabelled records (JSONL); counts go to OUT.stats.json")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--model", default="default", help="the judge LLM (default: the packaged generator)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="transformers backend: sequences per forward")
    p.add_argument("--tensor-parallel-size", type=int_at_least(1), default=1, help="vllm backend")
    p.add_argument("--max-model-len", type=int_at_least(16), default=4096, help="vllm backend")
    p.add_argument("--enforce-eager", action="store_true", help="vllm backend")
    p.add_argument("--candidates", type=int_at_least(1), default=5, help="nearest passages judged besides the seed")
    p.add_argument("--relevance", action="store_true",
                   help="also the yes/no relevance judgement, fused with query likelihood (a larger judge LLM)")
    p.add_argument("--round-trip-k", type=int_at_least(1), default=2,
                   help="drop a query whose seed passage is not in the judge's top K")
    p.add_argument("--negatives", type=int_at_least(0), default=1)
    p.add_argument("--negative-start", type=int_at_least(1), default=2, help="fused rank hard negatives start at")
    p.add_argument("--rrf-k", type=int_at_least(1), default=60)
    p.add_argument("--query-kinds-file", help="the kinds file the queries were written with (their labels)")
    p.add_argument("--chunk-size", type=int_at_least(1), default=512,
                   help="(query, passage) pairs per cached chunk of scores: the unit a killed run loses")
    p.add_argument("--cache-dir", help="score and embedding cache (default: OUT.cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier --out of this command")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def judge_fingerprint(args: argparse.Namespace, backend: Backend) -> str:
    """What the judge's scores depend on: the LLM's weights, the backend and its dtype, the prompts."""
    path = Path(model_path(args.model))
    weights = folder_fingerprint(path) if path.is_dir() else str(path)  # a hub id: its name
    return json.dumps({"weights": weights, "backend": args.backend, "dtype": args.dtype, "relevance": args.relevance,
                       "prompts": [LIKELIHOOD_CONTEXT, RELEVANCE_CONTEXT, YES, NO]}, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        settings = RelabelSettings(candidates=args.candidates, relevance=args.relevance,
                                   rrf_k=args.rrf_k, round_trip_k=args.round_trip_k, negatives=args.negatives,
                                   negative_start=args.negative_start, chunk_size=args.chunk_size)
        inputs = [args.input, args.corpus, args.embedder, args.query_kinds_file]
        check_output(out, inputs=inputs, kind=RELABELLED_KIND, overwrite=args.overwrite)
        check_output(stats_path(out), inputs=inputs, kind=STATS_KIND, overwrite=args.overwrite,
                     continues=not out.exists())
        cache = Path(args.cache_dir) if args.cache_dir else out.with_name(out.name + ".cache")
        check_output(cache, inputs=inputs, kind=CACHE_KIND, flag="--cache-dir", continues=True)
        records, passages_file = read_synth_records(Path(args.input))
        corpus = args.corpus or passages_file
        if corpus is None:
            raise DataError(f"--input {args.input}: no {PASSAGES_FILE} beside the records; pass --corpus")
        passages = read_passages(corpus)
        labels = {k.name: k.label for k in load_query_kinds(args.query_kinds_file).values()}
        encoder = load_encoder(args.embedder)
        if args.backend == "transformers":
            backend = create_backend("transformers", model=args.model, batch_size=args.batch_size,
                                     constrained=False, dtype=args.dtype)
        else:
            backend = create_backend("vllm", model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                                     dtype=args.dtype, enforce_eager=args.enforce_eager,
                                     max_model_len=args.max_model_len)
        judge = Judge(backend, settings.relevance)
        fingerprint = judge_fingerprint(args, backend)
        relabelled, report = relabel(records, passages, encoder, judge, settings, cache, not args.no_progress,
                                     fingerprint, labels)
    except (DataError, EncoderError, BackendError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = {"judge": json.loads(fingerprint) | {"model": args.model}, "embedder": encoder.name,
             "settings": asdict(settings), **report.to_json()}
    write_text(stats_path(out), json.dumps(stats, indent=2) + "\n")  # first: the records mark completion
    with staged_file(out) as handle:
        for record in relabelled:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    info = report.to_json()
    print(f"relabelled {info['queries_out']}/{info['queries_in']} queries -> {out}")
    for reason, count in sorted(report.dropped.items()):
        print(f"  dropped, {reason}: {count}")
    print(f"  positive moved off the seed passage: {report.positive_moved} ({info['positive_moved_share']:.1%})")
    print(f"  seed passage among the embedder's top {settings.candidates}: {report.seed_retrieved}")
    print(f"  pairs judged {report.pairs_scored}, from cache {report.pairs_from_cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m llmembed.mine --model M --input train.jsonl [--corpus corpus.jsonl] --out mined.jsonl``

Hard negatives for training records, with protection against false negatives.

Each query is searched against the corpus (default: every positive and negative of the input)
with faiss, exact inner product on normalised vectors unless ``--index hnsw|ivf`` is asked for
large corpora. Candidates come from a rank window (``--ranks 10:100``, counted after the
record's own positives and the query text are set aside), and the positive-aware rule of
NV-Retriever (arXiv 2407.15831, "TopK-PercPos") drops every candidate that scores above
``--positive-ratio`` (0.95) of the positive's score: such passages are most often unlabelled
positives, and training against them teaches the model to push relevant text away.
``--min-positive-score`` drops whole records whose positive the mining model scores low (the
pair filter of Conan, arXiv 2408.15710). Every drop is counted by reason.

``--cross-encoder CE`` re-scores each window's candidates and the positives with a
sentence-transformers cross-encoder (the RocketQA / NV-Retriever practice: the embedding model
finds candidates cheaply, a reranker judges them): negatives are then taken in the reranker's
order, and the positive-aware rule and ``--min-positive-score`` read its scores. Both kinds of
score are written to ``meta.mining``.

Embeddings are cached on disk in chunks named by a fingerprint of the model and the texts, so a
rerun (or a killed run, rerun) encodes nothing twice. Launched like training
(``torchrun --nproc_per_node N -m llmembed.mine ...``, or ``deepspeed --module``), the processes
share the encoding by chunks of that cache, each writing its own; the first then searches,
reranks and writes alone. The output keeps the shared record
schema; the scores go to ``meta.mining`` for distillation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from llmembed.argtypes import float_in, int_at_least
from llmembed.data import DataError, Record, read_jsonl
from llmembed.data.readers import json_lines
from llmembed.data.schema import parse_record
from llmembed.distributed import Shard, leave_group_and_exit
from llmembed.model import model_inputs
from llmembed.serve.encoders import EncoderError, load_cross_encoder, load_encoder
from llmembed.outputs import Kind, any_json_with, check_output, staged_file, write_text

logger = logging.getLogger("llmembed.mine")
INDEXES = ("flat", "hnsw", "ivf")


@dataclass
class MineSettings:
    rank_start: int = 10
    rank_end: int = 100
    num_negatives: int = 8
    positive_ratio: float | None = 0.95  # None: plain top-k, no false-negative filter
    min_positive_score: float | None = None
    index: str = "flat"
    keep_existing_negatives: bool = False
    instruction: str | None = None  # for records without their own
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.rank_start < self.rank_end:
            raise ValueError(f"rank window must satisfy 0 <= start < end, got {self.rank_start}:{self.rank_end}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {self.index!r}")


@dataclass
class MineReport:
    records_in: int = 0
    records_out: int = 0
    dropped_records: Counter = field(default_factory=Counter)
    dropped_candidates: Counter = field(default_factory=Counter)
    negatives_written: int = 0
    records_short_of_negatives: int = 0
    encoded: int = 0
    from_cache: int = 0
    encoded_here: int = 0  # by this process, when several share the encoding
    pairs_scored: int = 0  # by the cross-encoder
    pairs_from_cache: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"records_in": self.records_in, "records_out": self.records_out,
                "dropped_records": dict(self.dropped_records), "dropped_candidates": dict(self.dropped_candidates),
                "negatives_written": self.negatives_written,
                "records_short_of_negatives": self.records_short_of_negatives,
                "texts_encoded": self.encoded, "texts_from_cache": self.from_cache,
                "pairs_scored": self.pairs_scored, "pairs_from_cache": self.pairs_from_cache}


class EmbeddingCache:
    """Vectors of one text list under one model, stored as ``chunk-NNNNN.npy`` files in a folder
    named by the fingerprint of both. Each chunk is written atomically once; a rerun loads the
    finished chunks and encodes only the missing ones. ``encoded`` and ``from_cache`` count the
    texts of each kind.

    Several processes share the encoding through the folder: each fills the chunks its
    :class:`~llmembed.distributed.Shard` owns (:meth:`fill`), and once they all have, the leader
    loads every chunk (:meth:`load`)."""

    def __init__(self, root: Path | None, model_fingerprint: str, role: str, texts: Sequence[str],
                 chunk_size: int) -> None:
        digest = hashlib.sha256(model_fingerprint.encode())
        digest.update(role.encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode()).digest())
        self.key = digest.hexdigest()
        self.folder = root / f"{role}-{self.key[:24]}" if root is not None else None
        self.texts = list(texts)
        self.chunk_size = chunk_size
        self.encoded = 0
        self.from_cache = 0
        self._in_memory: dict[int, np.ndarray] = {}  # chunks of a cache without a folder

    def embeddings(self, encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Every text's vector, in one process."""
        self.fill(encode)
        return self.load()

    def _chunks(self) -> list[tuple[int, list[str]]]:
        return [(number, self.texts[start : start + self.chunk_size])
                for number, start in enumerate(range(0, len(self.texts), self.chunk_size))]

    def _path(self, number: int) -> Path | None:
        return self.folder / f"chunk-{number:05d}.npy" if self.folder is not None else None

    def _cached(self, number: int, rows: int) -> np.ndarray | None:
        path = self._path(number)
        if path is None or not path.is_file():
            return self._in_memory.get(number)
        try:
            chunk = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged chunk is encoded again
        return chunk if chunk.shape[0] == rows else None

    def fill(self, encode: Callable[[list[str]], np.ndarray], shard: Shard = Shard()) -> None:
        """Encode the chunks ``shard`` owns that are not cached yet."""
        if shard.count > 1 and self.folder is None:
            raise ValueError("several processes share an embedding cache through its folder: give one")
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        for number, texts in self._chunks():
            if not shard.owns(number):
                continue
            if self._cached(number, len(texts)) is not None:
                self.from_cache += len(texts)
                continue
            chunk = np.asarray(encode(texts), dtype=np.float32)
            self.encoded += len(texts)
            path = self._path(number)
            if path is None:
                self._in_memory[number] = chunk
                continue
            with staged_file(path, "wb") as handle:
                np.save(handle, chunk, allow_pickle=False)

    def load(self) -> np.ndarray:
        """Every chunk, in order (all filled: by this process, or by every shard)."""
        parts = []
        for number, texts in self._chunks():
            chunk = self._cached(number, len(texts))
            if chunk is None:
                raise RuntimeError(f"embedding cache {self.folder}: chunk {number} is missing or damaged")
            parts.append(chunk)
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def build_index(vectors: np.ndarray, kind: str):
    """A faiss inner-product index over ``vectors`` (normalised: inner product is cosine)."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 256
    else:
        nlist = max(1, int(np.sqrt(len(vectors))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, 16)
    index.add(vectors)
    return index


def read_corpus(path: str | Path) -> list[str]:
    """Passages from JSONL: ``{"text": ...}`` lines, or shared-schema records (their positives
    and negatives)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    texts: list[str] = []
    for number, item in json_lines(path):
        if isinstance(item, dict) and "text" in item:
            if not isinstance(item["text"], str) or not item["text"].strip():
                raise DataError(f"{path}:{number}: field 'text': expected a non-empty string")
            texts.append(item["text"])
            continue
        try:
            record = parse_record(item)
        except DataError as err:
            raise DataError(f"{path}:{number}: {err} (a corpus line is {{\"text\": ...}} or a record)") from None
        texts.extend(record.positives + record.negatives)
    return list(dict.fromkeys(texts))


@dataclass
class Candidates:
    """What the embedding search found for each record: the lowest score of its positives and
    its rank window (``(passage, score)`` in search order, own positives and query set aside)."""

    positive_scores: list[float]
    windows: list[list[tuple[str, float]]]


@dataclass
class Judged:
    """One record's candidates under the judge that picks negatives: the positive's score and the
    window as ``(passage, embedding score, judge score)`` in the judge's order. Without a
    cross-encoder the judge is the embedding itself."""

    positive_score: float
    window: list[tuple[str, float, float]]


def mine(records: Sequence[Record], corpus: Sequence[str], encoder, settings: MineSettings,
         cache_dir: Path | None = None, progress: bool = False, reranker=None,
         shard: Shard = Shard()) -> tuple[list[Record], MineReport]:
    """Mined copies of ``records`` and the counts (see the module docstring): candidates from
    the embedding search, judged (by ``reranker``, a :class:`llmembed.serve.encoders.PairScorer`, when
    given: negatives then come in its order, and the positive-aware rule and
    ``min_positive_score`` read its scores), then selected. With several processes (``shard``)
    they share the encoding and the leader does the rest: the others return no records."""
    report = MineReport(records_in=len(records))
    candidates = find_candidates(records, corpus, encoder, settings, cache_dir, progress, report, shard)
    if candidates is None:
        return [], report
    judged = (rerank(records, candidates, reranker, progress, cache_dir, settings.chunk_size, report)
              if reranker is not None else
              [Judged(p, [(t, s, s) for t, s in w]) for p, w in zip(candidates.positive_scores, candidates.windows)])
    mined: list[Record] = []
    for record, embedding_positive, judgement in zip(records, candidates.positive_scores, judged):
        chosen = select_negatives(record, judgement, settings, report)
        if chosen is None:
            continue
        negatives, negative_scores, judge_scores = chosen
        mining: dict[str, Any] = {"model": encoder.name, "positive_score": embedding_positive,
                                  "negative_scores": negative_scores}
        if reranker is not None:
            mining.update(reranker=reranker.name, reranker_positive_score=judgement.positive_score,
                          reranker_negative_scores=judge_scores)
        mined.append(Record(record.query, list(record.positives), negatives, record.instruction, record.task,
                            record.score, {**record.meta, "mining": mining}))
        report.negatives_written += len(negatives)
    report.records_out = len(mined)
    return mined, report


def find_candidates(records: Sequence[Record], corpus: Sequence[str], encoder, settings: MineSettings,
                    cache_dir: Path | None, progress: bool, report: MineReport,
                    shard: Shard = Shard()) -> Candidates | None:
    """Encode (through the cache), search the corpus, and cut each record's rank window. With
    several processes, each encodes its ``shard`` of every text list's chunks; the leader then
    searches alone, and the others get None."""
    corpus = list(dict.fromkeys(corpus))
    if len(corpus) < settings.rank_end:
        raise ValueError(f"the corpus has {len(corpus)} passages, fewer than the rank window's end "
                         f"({settings.rank_end}); give a larger corpus or a smaller --ranks")
    instructions = [r.instruction if r.instruction is not None else settings.instruction for r in records]
    query_keys = [json.dumps([i, r.query], ensure_ascii=False) for i, r in zip(instructions, records)]
    corpus_row = {text: n for n, text in enumerate(corpus)}
    # Positives outside the corpus (a separate --corpus) are encoded on their own.
    positives = [p for p in dict.fromkeys(p for r in records for p in r.positives) if p not in corpus_row]

    def encode_queries(keys: list[str]) -> np.ndarray:
        pairs = [json.loads(k) for k in keys]
        return encoder.encode_queries([q for _, q in pairs], [i for i, _ in pairs], progress)

    unique_keys = list(dict.fromkeys(query_keys))
    caches = {role: (EmbeddingCache(cache_dir, encoder.fingerprint, role, keys, settings.chunk_size), encode)
              for role, keys, encode in (("corpus", corpus, lambda t: encoder.encode_passages(t, progress)),
                                         ("positives", positives, lambda t: encoder.encode_passages(t, progress)),
                                         ("queries", unique_keys, encode_queries))}
    for cache, encode in caches.values():
        cache.fill(encode, shard)
    report.encoded_here = sum(cache.encoded for cache, _ in caches.values())
    report.encoded += shard.total(report.encoded_here)
    report.from_cache += shard.total(sum(cache.from_cache for cache, _ in caches.values()))
    shard.wait_for_all()
    if not shard.leads:
        return None
    corpus_vectors, positive_vectors, query_vectors = (cache.load() for cache, _ in caches.values())
    query_row = {k: n for n, k in enumerate(unique_keys)}
    positive_row = {p: n for n, p in enumerate(positives)}

    def positive_vector(text: str) -> np.ndarray:
        return corpus_vectors[corpus_row[text]] if text in corpus_row else positive_vectors[positive_row[text]]

    index = build_index(corpus_vectors, settings.index)
    extra = max(len(r.positives) for r in records) + 1 if records else 1
    scores, ids = index.search(query_vectors, min(len(corpus), settings.rank_end + extra))
    positive_scores: list[float] = []
    windows: list[list[tuple[str, float]]] = []
    for record, key in zip(records, query_keys):
        row = query_row[key]
        positive_scores.append(min(float(query_vectors[row] @ positive_vector(p)) for p in record.positives))
        own = set(record.positives) | {record.query}
        ranked = []
        for score, idx in zip(scores[row], ids[row]):
            if idx < 0:
                continue
            if corpus[idx] in own:
                report.dropped_candidates["is_positive_or_query"] += 1
                continue
            ranked.append((corpus[idx], float(score)))
        windows.append(ranked[settings.rank_start : settings.rank_end])
    return Candidates(positive_scores, windows)


def rerank(records: Sequence[Record], candidates: Candidates, reranker, progress: bool, cache_dir: Path | None,
           chunk_size: int, report: MineReport) -> list[Judged]:
    """Each record's lowest positive score and its window under ``reranker``, from one batched
    pass over the distinct (query, passage) pairs, cached like the embeddings (by the reranker's
    fingerprint and the pairs), so a rerun scores nothing twice; the window in the reranker's order."""
    pairs: dict[tuple[str, str], int] = {}
    for record, window in zip(records, candidates.windows):
        for text in [*record.positives, *(t for t, _ in window)]:
            pairs.setdefault((record.query, text), len(pairs))
    keys = [json.dumps(pair, ensure_ascii=False) for pair in pairs]
    cache = EmbeddingCache(cache_dir, reranker.fingerprint, "rerank", keys, chunk_size)
    values = cache.embeddings(
        lambda chunk: reranker.score([tuple(json.loads(k)) for k in chunk], progress)[:, None])[:, 0]
    report.pairs_scored += cache.encoded
    report.pairs_from_cache += cache.from_cache
    judged = []
    for record, window in zip(records, candidates.windows):
        scored = [(t, s, float(values[pairs[(record.query, t)]])) for t, s in window]
        judged.append(Judged(min(float(values[pairs[(record.query, p)]]) for p in record.positives),
                             sorted(scored, key=lambda c: -c[2])))
    return judged


def select_negatives(record: Record, judged: Judged, settings: MineSettings,
                     report: MineReport) -> tuple[list[str], list[float | None], list[float | None]] | None:
    """The record's negatives with their embedding and judge scores, or None when the judge scores
    its positive below ``min_positive_score``. Candidates above ``positive_ratio`` of the
    positive's judge score are set aside as likely unlabelled positives."""
    if settings.min_positive_score is not None and judged.positive_score < settings.min_positive_score:
        report.dropped_records["positive_below_min_score"] += 1
        return None
    negatives, negative_scores, judge_scores = [], [], []
    for text, score, judge in judged.window:
        if len(negatives) == settings.num_negatives:
            break
        if settings.positive_ratio is not None and judge > settings.positive_ratio * judged.positive_score:
            report.dropped_candidates["above_positive_ratio"] += 1
            continue
        negatives.append(text)
        negative_scores.append(score)
        judge_scores.append(judge)
    if len(negatives) < settings.num_negatives:
        report.records_short_of_negatives += 1
    if settings.keep_existing_negatives:
        kept = [n for n in record.negatives if n not in negatives]
        negatives = kept + negatives
        negative_scores, judge_scores = [None] * len(kept) + negative_scores, [None] * len(kept) + judge_scores
    return negatives, negative_scores, judge_scores


def _ranks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 10:100), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return start, end


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with staged_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


def _is_mined_output(path: Path) -> bool:
    """A file this command wrote: its counts lie beside it."""
    return any_json_with("records_in", "model_fingerprint")(stats_path(path))


MINED_KIND = Kind("mined records written by llmembed.mine (no OUT.stats.json beside it)", folder=False,
                  recognise=_is_mined_output)
STATS_KIND = Kind("mining counts", folder=False, recognise=any_json_with("records_in", "model_fingerprint"))
CACHE_KIND = Kind("an embedding cache", folder=True, recognise=lambda path: True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.mine", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", required=True, help="our model folder or export, or a sentence-transformers folder")
    parser.add_argument("--input", required=True, help="training records (JSONL, shared schema)")
    parser.add_argument("--corpus", help='passages to mine from: {"text": ...} lines or records (default: the input\'s)')
    parser.add_argument("--out", required=True, help="mined records (JSONL); counts go to OUT.stats.json")
    parser.add_argument("--ranks", type=_ranks, default=(10, 100), help="rank window START:END (default 10:100)")
    parser.add_argument("--num-negatives", type=int_at_least(1), default=8)
    parser.add_argument("--positive-ratio", type=float_in(0.0, 1.0, low_open=True), default=0.95,
                        help="drop candidates scoring above this share of the positive's score (default 0.95)")
    parser.add_argument("--no-positive-filter", action="store_true", help="plain top-k: no false-negative filter")
    parser.add_argument("--min-positive-score", type=float_in(-1.0, 1.0), default=None,
                        help="drop records whose positive scores below this (cosine)")
    parser.add_argument("--cross-encoder", metavar="CE",
                        help="re-score the window's candidates with this sentence-transformers cross-encoder folder")
    parser.add_argument("--index", choices=INDEXES, default="flat", help="faiss index (flat is exact)")
    parser.add_argument("--instruction", help="query instruction for records without one")
    parser.add_argument("--keep-existing-negatives", action="store_true")
    parser.add_argument("--backend", choices=("auto", "llmembed", "sentence-transformers"), default="auto")
    parser.add_argument("--cache-dir", help="embedding cache (default: OUT.cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --out of this command")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--chunk-size", type=int_at_least(1), default=4096,
                        help="texts per cached chunk of vectors: what a rerun resumes from, and the unit that "
                             "several processes share out")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        inputs = [args.input, args.corpus, args.cross_encoder,
                  *(model_inputs(args.model) if Path(args.model).is_dir() else [])]
        check_output(out, inputs=inputs, kind=MINED_KIND, overwrite=args.overwrite)
        # Counts without their records are what a run killed between the two writes leaves.
        check_output(stats_path(out), inputs=inputs, kind=STATS_KIND, overwrite=args.overwrite,
                     continues=not out.exists())
        cache = Path(args.cache_dir) if args.cache_dir else out.with_name(out.name + ".cache")
        # A rerun reads the cache it wrote: it continues, whatever --overwrite says.
        check_output(cache, inputs=inputs, kind=CACHE_KIND, flag="--cache-dir", continues=True)
        settings = MineSettings(rank_start=args.ranks[0], rank_end=args.ranks[1], num_negatives=args.num_negatives,
                                positive_ratio=None if args.no_positive_filter else args.positive_ratio,
                                min_positive_score=args.min_positive_score, index=args.index,
                                keep_existing_negatives=args.keep_existing_negatives, instruction=args.instruction,
                                chunk_size=args.chunk_size)
        records = read_jsonl(args.input)
        if not records:
            raise DataError(f"{args.input}: no records")
        corpus = read_corpus(args.corpus) if args.corpus else list(
            dict.fromkeys(t for r in records for t in r.positives + r.negatives))
        if not corpus:
            raise DataError(f"{args.corpus}: no passages")
        # Launched by torchrun or deepspeed with several processes, they share the encoding.
        shard = Shard.from_launcher()
        encoder = load_encoder(args.model, args.backend, args.trust_remote_code, args.batch_size)
        reranker = (load_cross_encoder(args.cross_encoder, args.trust_remote_code, args.batch_size)
                    if args.cross_encoder and shard.leads else None)
        mined, report = mine(records, corpus, encoder, settings, cache, progress=not args.no_progress,
                             reranker=reranker, shard=shard)
    except (DataError, EncoderError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not shard.leads:
        print(f"process {shard.index} of {shard.count}: encoded {report.encoded_here} texts")
        leave_group_and_exit()
        return 0
    # The counts first: the records' arrival then marks a complete output (see MINED_KIND).
    stats = {"model": encoder.name, "model_fingerprint": encoder.fingerprint,
             **({"cross_encoder": reranker.name, "cross_encoder_fingerprint": reranker.fingerprint} if reranker else {}),
             "settings": vars(settings),
             **report.to_json()}
    write_text(stats_path(out), json.dumps(stats, indent=2) + "\n")
    _write_jsonl(out, [r.to_json() for r in mined])
    print(f"mined {report.records_out}/{report.records_in} records, {report.negatives_written} negatives -> {out}")
    for reason, count in sorted(report.dropped_records.items()):
        print(f"  records dropped, {reason}: {count}")
    for reason, count in sorted(report.dropped_candidates.items()):
        print(f"  candidates set aside, {reason}: {count}")
    print(f"  records short of {settings.num_negatives} negatives: {report.records_short_of_negatives}")
    print(f"  texts encoded {report.encoded}, from cache {report.from_cache}")
    if reranker is not None:
        print(f"  pairs scored by the cross-encoder {report.pairs_scored}, from cache {report.pairs_from_cache}")
    if shard.count > 1:
        print(f"  encoding shared by {shard.count} processes; this one encoded {report.encoded_here} texts")
    leave_group_and_exit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Positive-aware hard-negative mining with the real packaged all-MiniLM-L6-v2 and faiss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmembed.data import Record
from llmembed.serve.encoders import load_encoder, reference_model_dir
from llmembed.mine import MineSettings, mine

QUERY = "How do I reset my router password?"
POSITIVE = "To reset the router password, hold the reset button for ten seconds and sign in with the default password."
DUPLICATE = "To reset your router's password, hold its reset button for 10 seconds, then sign in with the default password."
DISTRACTORS = [
    "Routers forward packets between networks using routing tables.",
    "A strong password mixes letters, digits and symbols.",
    "Wi-Fi signals weaken through concrete walls.",
    "The modem connects your home to the internet provider.",
    "Change the default admin password after installing a router.",
    "Bananas are rich in potassium.",
    "The Eiffel Tower is in Paris.",
    "Photosynthesis turns light into chemical energy.",
    "A good night's sleep improves memory.",
    "Python lists keep items in insertion order.",
    "Mount Everest is the highest mountain above sea level.",
    "Firmware updates fix security holes in network devices.",
    "Coffee beans are roasted seeds.",
    "Reset your email password from the account settings page.",
    "Ethernet cables come in categories such as Cat5e and Cat6.",
    "The violin has four strings.",
]
RECORDS = [
    Record(QUERY, [POSITIVE]),
    Record("What is the capital of France?", ["Paris is the capital and largest city of France."]),
    Record("Which fruit is high in potassium?", ["Bananas are a well-known source of potassium."]),
    Record("How many strings does a violin have?", ["A violin is strung with four strings tuned in fifths."]),
]
CORPUS = [r.positives[0] for r in RECORDS] + [DUPLICATE] + DISTRACTORS


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(reference_model_dir())


def _ranking(encoder, record: Record, corpus: list[str] = CORPUS) -> list[tuple[str, float]]:
    """Brute force: every corpus passage but the record's own, by cosine, best first."""
    q = encoder.encode_queries([record.query])[0]
    passages = [t for t in corpus if t not in record.positives and t != record.query]
    scores = encoder.encode_passages(passages) @ q
    return [(passages[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]


def test_positive_aware_filter_drops_the_duplicate_that_plain_top_k_keeps(encoder, tmp_path):
    q = encoder.encode_queries([QUERY])[0]
    pos, dup = encoder.encode_passages([POSITIVE, DUPLICATE]) @ q
    assert dup > 0.95 * pos  # the fixture: a paraphrase of the positive, unlabelled in the corpus
    plain, plain_report = mine(RECORDS, CORPUS, encoder, MineSettings(0, 10, 3, positive_ratio=None))
    aware, aware_report = mine(RECORDS, CORPUS, encoder, MineSettings(0, 10, 3, positive_ratio=0.95))
    assert plain[0].negatives[0] == DUPLICATE
    assert DUPLICATE not in aware[0].negatives and len(aware[0].negatives) == 3
    ranking = _ranking(encoder, RECORDS[0])
    # Everything the rule set aside scored above 95% of the positive, and nothing else was.
    above = [t for t, s in ranking if s > 0.95 * pos]
    assert DUPLICATE in above
    assert aware[0].negatives == [t for t, _ in ranking if t not in above][:3]
    assert aware_report.dropped_candidates["above_positive_ratio"] >= len(above)
    assert "above_positive_ratio" not in plain_report.dropped_candidates
    scores = aware[0].meta["mining"]["negative_scores"]
    assert scores == sorted(scores, reverse=True) and max(scores) <= 0.95 * aware[0].meta["mining"]["positive_score"]
    assert abs(aware[0].meta["mining"]["positive_score"] - pos) < 1e-5


def test_rank_window_takes_exactly_those_ranks(encoder):
    mined, report = mine(RECORDS, CORPUS, encoder, MineSettings(2, 6, 10, positive_ratio=None))
    for record, out in zip(RECORDS, mined):
        assert out.negatives == [t for t, _ in _ranking(encoder, record)[2:6]]
        assert out.positives == record.positives and out.query == record.query
    # Each record set its own positive aside once, and none got the 10 it asked for.
    assert report.dropped_candidates["is_positive_or_query"] == len(RECORDS)
    assert report.records_short_of_negatives == len(RECORDS) and report.negatives_written == 4 * len(RECORDS)


def test_min_positive_score_drops_weak_pairs_and_counts_them(encoder):
    weak = Record("What is the capital of France?", ["The violin has four strings."])
    records = RECORDS + [weak]
    mined, report = mine(records, CORPUS, encoder, MineSettings(0, 10, 2, min_positive_score=0.4))
    assert [r.query for r in mined] == [r.query for r in RECORDS]
    assert report.dropped_records == {"positive_below_min_score": 1}
    assert report.records_in == 5 and report.records_out == 4


def test_cache_reencodes_nothing_and_repairs_a_damaged_chunk(encoder, tmp_path):
    settings = MineSettings(0, 10, 3, chunk_size=8)
    first, report = mine(RECORDS, CORPUS, encoder, settings, cache_dir=tmp_path)
    assert report.encoded == len(CORPUS) + len(RECORDS) and report.from_cache == 0
    again, report = mine(RECORDS, CORPUS, encoder, settings, cache_dir=tmp_path)
    assert report.encoded == 0 and report.from_cache == len(CORPUS) + len(RECORDS)
    assert [r.negatives for r in again] == [r.negatives for r in first]
    chunk = sorted(tmp_path.glob("corpus-*/chunk-00001.npy"))[0]
    chunk.write_bytes(chunk.read_bytes()[:50])
    repaired, report = mine(RECORDS, CORPUS, encoder, settings, cache_dir=tmp_path)
    assert report.encoded == 8 and [r.negatives for r in repaired] == [r.negatives for r in first]
    # Another model or other texts never read these chunks.
    other, report = mine(RECORDS[:3], CORPUS, encoder, settings, cache_dir=tmp_path)
    assert report.encoded == 3  # the corpus is shared, the query list is new


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_indexes_agree_with_exact_search_on_a_small_corpus(encoder, index):
    exact, _ = mine(RECORDS, CORPUS, encoder, MineSettings(0, 10, 4))
    approx, _ = mine(RECORDS, CORPUS, encoder, MineSettings(0, 10, 4, index=index))
    assert [r.negatives for r in approx] == [r.negatives for r in exact]


def test_the_command_writes_records_the_trainer_reads_and_counts(tmp_path):
    import subprocess
    import sys

    from llmembed.data import read_jsonl

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in RECORDS))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    out = tmp_path / "mined.jsonl"
    command = [sys.executable, "-m", "llmembed.mine", "--model", str(reference_model_dir()), "--input", str(data),
               "--corpus", str(corpus), "--out", str(out), "--ranks", "0:10", "--num-negatives", "3", "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    mined = read_jsonl(out)
    assert len(mined) == len(RECORDS) and all(len(r.negatives) == 3 for r in mined)
    assert DUPLICATE not in mined[0].negatives
    stats = json.loads((tmp_path / "mined.jsonl.stats.json").read_text())
    assert stats["records_out"] == 4 and stats["texts_encoded"] == len(CORPUS) + len(RECORDS)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr  # an earlier output stays
    rerun = subprocess.run(command + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert "texts encoded 0" in rerun.stdout
    assert read_jsonl(out) == mined


def test_replacing_the_backbone_a_trained_folder_names_invalidates_the_cache(tiny_llama_dir, tmp_path):
    """The cache key covers every weight file the model is loaded from: a LoRA folder's own files
    and the backbone it names. A backbone replaced in place re-encodes everything and gives the
    negatives a fresh run gives."""
    import shutil

    from llmembed.mine import main as mine_main

    from .conftest import save_tiny
    from .test_export import trained_model

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_llama_dir, backbone)
    trained_model(backbone, "mean", False).save(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in RECORDS))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    args = ["--model", str(tmp_path / "model"), "--input", str(data), "--corpus", str(corpus), "--ranks", "0:10",
            "--num-negatives", "3", "--no-progress"]
    assert mine_main(args + ["--out", str(tmp_path / "first.jsonl")]) == 0
    save_tiny(backbone, "llama", tiny_llama_dir, seed=5, vocab_size=49152, hidden_size=128, heads=2, kv_heads=1)
    assert mine_main(args + ["--out", str(tmp_path / "first.jsonl"), "--overwrite"]) == 0
    stats = json.loads((tmp_path / "first.jsonl.stats.json").read_text())
    assert stats["texts_from_cache"] == 0 and stats["texts_encoded"] == len(CORPUS) + len(RECORDS)
    assert mine_main(args + ["--out", str(tmp_path / "fresh.jsonl")]) == 0  # its own, empty cache
    assert (tmp_path / "first.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()


@pytest.fixture(scope="module")
def cross_encoder(module_tmp):
    """A small random BERT reranker (one label) with the packaged encoder's real tokenizer,
    loaded through sentence-transformers' CrossEncoder: what the option runs, untrained."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llmembed.serve.encoders import load_cross_encoder

    folder = module_tmp("reranker")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(reference_model_dir()).save_pretrained(folder)
    return load_cross_encoder(folder)


def test_cross_encoder_rescoring_orders_and_filters_by_the_reranker(encoder, cross_encoder, tmp_path):
    # A copy of the positive that differs only in spacing: the same tokens, so the reranker
    # gives it exactly the positive's score and the positive-aware rule must set it aside.
    twin = POSITIVE.replace(" ", "  ")
    corpus = CORPUS + [twin]
    settings = MineSettings(0, 10, 4)
    plain, _ = mine(RECORDS, corpus, encoder, MineSettings(0, 10, 4, positive_ratio=None))
    assert twin in plain[0].negatives  # embedding top-k keeps it
    mined, report = mine(RECORDS, corpus, encoder, settings, reranker=cross_encoder)
    for record, out in zip(RECORDS, mined):
        window = [t for t, _ in _ranking(encoder, record, corpus)[:10]]
        judge = cross_encoder.model.predict([[record.query, t] for t in [record.positives[0], *window]])
        positive, candidates = float(judge[0]), dict(zip(window, map(float, judge[1:])))
        expected = [t for t in sorted(window, key=lambda t: -candidates[t]) if candidates[t] <= 0.95 * positive][:4]
        assert out.negatives == expected and len(expected) >= 2  # the reranker's scores do spread
        mining = out.meta["mining"]
        assert mining["reranker"] == cross_encoder.name
        assert abs(mining["reranker_positive_score"] - positive) < 1e-6
        assert np.allclose(mining["reranker_negative_scores"], [candidates[t] for t in expected], atol=1e-6)
    assert twin not in mined[0].negatives
    assert report.dropped_candidates["above_positive_ratio"] >= 1
    # Reranker scores are cached by fingerprint and pairs: a rerun scores nothing again.
    cache = tmp_path / "cache"
    first, report = mine(RECORDS, corpus, encoder, settings, cache_dir=cache, reranker=cross_encoder)
    assert report.pairs_scored > 0 and report.pairs_from_cache == 0
    again, report = mine(RECORDS, corpus, encoder, settings, cache_dir=cache, reranker=cross_encoder)
    assert report.pairs_scored == 0 and report.pairs_from_cache > 0
    assert [r.to_json() for r in again] == [r.to_json() for r in first] == [r.to_json() for r in mined]
    # With the reranker as judge, --min-positive-score reads its scores too.
    lowest = min(m.meta["mining"]["reranker_positive_score"] for m in mined)
    kept, report = mine(RECORDS, corpus, encoder, MineSettings(0, 10, 4, min_positive_score=lowest + 1e-6),
                        reranker=cross_encoder)
    assert len(kept) == len(RECORDS) - 1 and report.dropped_records == {"positive_below_min_score": 1}


def test_cross_encoder_bad_folders_are_one_line_errors(tmp_path):
    from llmembed.serve.encoders import EncoderError, load_cross_encoder

    with pytest.raises(EncoderError, match="no such cross-encoder folder"):
        load_cross_encoder(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EncoderError, match="has no weights"):
        load_cross_encoder(tmp_path)


@pytest.mark.integration
def test_processes_launched_like_training_share_the_encoding_and_mine_the_same(tmp_path):
    """torchrun with 2 processes: each encodes its own chunks of the cache (every chunk written
    once, the work split), the first searches and writes, and the output equals one process's."""
    import os
    import sys

    from llmembed.data import read_jsonl
    from tests.processes import run_group
    from tests.train_utils import free_port

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in RECORDS))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    args = ["--model", str(reference_model_dir()), "--input", str(data), "--corpus", str(corpus), "--ranks", "0:10",
            "--num-negatives", "3", "--no-progress", "--chunk-size", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    single = run_group([sys.executable, "-m", "llmembed.mine", *args, "--out", str(tmp_path / "one.jsonl")],
                       env, tmp_path, 300, "one process")
    shared = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "llmembed.mine", *args, "--out", str(tmp_path / "two.jsonl")],
                       env, tmp_path, 300, "two processes")
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [(r.query, r.negatives) for r in two] == [(r.query, r.negatives) for r in one]
    for a, b in zip(one, two):
        assert b.meta["mining"]["negative_scores"] == pytest.approx(a.meta["mining"]["negative_scores"], abs=1e-5)
    stats_one = json.loads((tmp_path / "one.jsonl.stats.json").read_text())
    stats_two = json.loads((tmp_path / "two.jsonl.stats.json").read_text())
    total = len(CORPUS) + len(RECORDS)
    assert stats_one["texts_encoded"] == stats_two["texts_encoded"] == total
    # Chunks of 4: the corpus's 21 texts make 6 chunks, the 4 queries one (no positives outside
    # the corpus). Process 0 owns chunks 0, 2, 4 of the corpus and the queries' chunk 0.
    mine_here = int(shared.stdout.split("this one encoded ")[1].split()[0])
    other = int(shared.stdout.split("process 1 of 2: encoded ")[1].split()[0])
    assert (mine_here, other) == (4 * 3 + len(RECORDS), total - 4 * 3 - len(RECORDS))
    chunks = sorted(p.relative_to(tmp_path / "two.jsonl.cache").as_posix()
                    for p in (tmp_path / "two.jsonl.cache").rglob("chunk-*.npy"))
    assert len(chunks) == 7 and len(set(chunks)) == 7

"""Corpus-grounded generation and LLM relabelling with real models: the packaged SmolLM2-135M
as generator and judge, the packaged all-MiniLM-L6-v2 as the embedder that retrieves candidates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.grounded import load_query_kinds, parse_query, read_passages
from synth.parse import ParseError
from synth.judge import Judge, fused_order
from synth.relabel import RelabelSettings, relabel

from .processes import kill_tree

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment now (the session fixture has pointed LLMEMBED_CACHE into a temp dir)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Six passages on distinct topics, a passage that answers the planted query better than its
# seed, and chit-chat.
PASSAGES = [
    ("p0", "The pancreas produces insulin, which lowers the level of sugar in the blood."),
    ("p1", "Mount Everest is the highest mountain on Earth, at 8,849 metres above sea level."),
    ("p2", "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("p3", "The Python programming language was created by Guido van Rossum and released in 1991."),
    ("p4", "Many tourists visit Europe every summer."),
    ("p5", "Paris is the capital of France."),
    ("p6", "i certainly do at times."),
    ("p7", "A violin has four strings and is played with a bow."),
]
QUERIES = [
    ("Which organ produces insulin?", "p0"),
    ("What is the highest mountain on Earth?", "p1"),
    ("How do plants make sugar from sunlight?", "p2"),
    ("Who created the Python programming language?", "p3"),
    ("How many strings does a violin have?", "p7"),
    ("What is the capital of France?", "p4"),       # planted: p5 answers it better than its seed
    ("What is the capital of Chile?", "p6"),        # planted: unanswerable from its seed
]


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in PASSAGES))
    return path


def _records() -> list[dict]:
    return [{"query": q, "positive": dict(PASSAGES)[p], "negatives": [], "instruction": None, "task": "corpus/question",
             "score": None, "meta": {"passage_id": p, "kind": "question"}} for q, p in QUERIES]


@pytest.fixture(scope="module")
def backend(default_dir):
    from synth.backends import create_backend

    return create_backend("transformers", model=str(default_dir), batch_size=4, constrained=False, dtype="float32")


@pytest.fixture(scope="module")
def embedder():
    from llmembed.serve.encoders import load_encoder, reference_model_dir

    return load_encoder(reference_model_dir())


def test_query_likelihood_and_relevance_equal_hand_computed_log_probabilities(backend):
    judge = Judge(backend, relevance=True)
    pairs = [(q, dict(PASSAGES)[p], "Question") for q, p in QUERIES[:4]]  # lengths differ: padding is exercised
    scores = judge.score(pairs)
    lm, tokenizer = backend.lm, backend.tokenizer
    for (query, passage, label), (likelihood, relevance) in zip(pairs, scores):
        def logprobs(context: str, target: str) -> list[float]:
            c = tokenizer(context)["input_ids"]
            t = tokenizer(target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = lm(torch.tensor([c + t])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            return [float(lp[len(c) - 1 + k, tok]) for k, tok in enumerate(t)]

        by_hand = np.mean(logprobs(f"Passage: {passage}\n{label}:", " " + query))
        assert abs(likelihood - by_hand) <= 1e-5, (query, likelihood, by_hand)
        context = f"Passage: {passage}\nQuery: {query}\nDoes the passage answer the query? Answer Yes or No.\nAnswer:"
        odds = logprobs(context, " Yes")[0] - logprobs(context, " No")[0]
        assert abs(relevance - odds) <= 1e-5, (query, relevance, odds)


def test_fusion_ranks_by_both_judgements():
    # likelihood prefers 2, then 0; relevance prefers 0, then 2: their fusion ties 0 and 2 (the seed, 0, first)
    assert fused_order([-2.0, -5.0, -1.0], [3.0, -1.0, 2.0], k=60) == [0, 2, 1]
    assert fused_order([-2.0, -5.0, -1.0], None, k=60) == [2, 0, 1]
    assert fused_order([-1.0, -1.0], [0.0, 0.0], k=60) == [0, 1]


def test_planted_queries_move_to_the_better_passage_or_are_dropped(tmp_path, backend, embedder):
    """The planted query's seed passage is a worse match than another corpus passage: that one
    becomes its positive. The unanswerable planted query is dropped by the round trip, and only it."""
    passages = read_passages(_corpus(tmp_path))
    out, report = relabel(_records(), passages, embedder, Judge(backend, relevance=False),
                          RelabelSettings(candidates=3, round_trip_k=2, negatives=1), tmp_path / "cache",
                          judge_fingerprint="test")
    kept = {r["query"]: r for r in out}
    assert set(kept) == {q for q, _ in QUERIES} - {"What is the capital of Chile?"}
    assert dict(report.dropped) == {"seed_outside_judge_top_k": 1}
    france = kept["What is the capital of France?"]
    assert france["positive"] == "Paris is the capital of France."
    assert france["meta"]["relabel"]["positive_moved"] and france["meta"]["relabel"]["seed_rank"] == 1
    for query, seed in QUERIES[:5]:  # the others keep their own passage
        assert kept[query]["positive"] == dict(PASSAGES)[seed]
        assert dict(PASSAGES)[seed] not in kept[query]["negatives"]
    assert report.positive_moved == 1
    # the scores kept for distillation are the candidates' query likelihoods
    relabelled = france["meta"]["relabel"]
    assert relabelled["positive_score"] == max(relabelled["likelihood"][i] for i in relabelled["fused_order"][:1])


def _relabel_cmd(synth: Path, out: Path, embedder_dir: Path) -> list[str]:
    return [sys.executable, "-m", "synth.relabel", "--input", str(synth), "--embedder", str(embedder_dir),
            "--out", str(out), "--candidates", "3", "--chunk-size", "4", "--batch-size", "4", "--no-progress"]


def _synth_folder(tmp_path: Path) -> Path:
    """A corpus-mode synth folder holding the planted records (as synth.generate lays it out)."""
    folder = tmp_path / "synth"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "part000of001-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (folder / "passages.jsonl").write_text(_corpus(tmp_path).read_text())
    return folder


def test_a_killed_relabelling_reruns_to_the_same_output(tmp_path, default_dir):
    from llmembed.serve.encoders import reference_model_dir

    synth = _synth_folder(tmp_path)
    whole = tmp_path / "whole.jsonl"
    done = subprocess.run(_relabel_cmd(synth, whole, reference_model_dir()), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relabelled 6/7 queries" in done.stdout

    killed = tmp_path / "killed.jsonl"
    cache = Path(str(killed) + ".cache")
    proc = subprocess.Popen(_relabel_cmd(synth, killed, reference_model_dir()), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # killed once some chunks of the judge's scores are on disk, before the records are
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(cache.glob("judge-*/chunk-*.npy"))) >= 2:
                break
            time.sleep(0.01)
        was_running = proc.poll() is None
    finally:
        kill_tree(proc)
    assert was_running and not killed.exists()
    rerun = subprocess.run(_relabel_cmd(synth, killed, reference_model_dir()), env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stats = json.loads(Path(str(killed) + ".stats.json").read_text())
    assert stats["pairs_from_cache"] >= 8 and stats["pairs_scored"] < stats["pairs_from_cache"] + stats["pairs_scored"]
    assert killed.read_text() == whole.read_text()


def test_corpus_mode_generates_grounded_records_and_resumes(tmp_path, default_dir):
    corpus = _corpus(tmp_path)
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "synth.generate", "--out", str(out), "--corpus", str(corpus), "--model", str(default_dir),
           "--query-kinds", "question", "keywords", "--queries-per-passage", "2", "--temperature", "0.7",
           "--max-tokens", "24", "--shard-size", "6", "--batch-size", "8", "--no-progress"]
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(l) for p in sorted((out / "shards").glob("*.jsonl")) for l in p.read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["generated"] == 16 and manifest["categories"] == ["question", "keywords"]
    assert manifest["totals"]["accepted"] == len(records) >= 8
    text_of = dict(PASSAGES)
    kinds = load_query_kinds()
    for r in records:
        meta = r["meta"]
        assert r["positive"] == text_of[meta["passage_id"]] and r["task"] == f"corpus/{meta['kind']}"
        assert r["instruction"] == kinds[meta["kind"]].instruction and set(meta["params"]) == {"query_length", "clarity"}
        assert "\n" not in r["query"] and (meta["kind"] != "question" or r["query"].endswith("?"))
    passages = [json.loads(l) for l in (out / "passages.jsonl").read_text().splitlines()]
    assert [p["id"] for p in passages] == [i for i, _ in PASSAGES]
    shards_before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    (out / "stats" / "part000of001-00002.json").unlink()  # the last shard as if killed before it finished
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shards_before


def test_corpus_input_errors_name_file_line_and_field(tmp_path):
    cases = {
        '{"text": "a"}\nnot json\n': ":2: malformed JSON",
        '{"text": ""}\n': ":1: field 'text'",
        '{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n': ":2: field 'id'",
        '{"body": "a"}\n': ':1: expected {"text"',
    }
    for number, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"c{number}.jsonl"
        path.write_text(content)
        with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
            read_passages(path)
    path = tmp_path / "dup.jsonl"
    path.write_text('{"text": "Hello, World"}\n{"text": "hello world!"}\n{"text": "other"}\n')
    assert [p.id for p in read_passages(path)] == ["line1", "line3"]


def test_a_generated_query_is_checked_before_it_is_kept():
    kind = load_query_kinds()["question"]
    assert parse_query(' "Which organ makes insulin?"', kind, "fewshot", None) == {
        "task": kind.instruction, "query": "Which organ makes insulin?"}
    for text, reason in (("  ", "empty_query"), ("Passage: what?", "echoes_prompt"), ("Insulin is made.", "not_a_question")):
        with pytest.raises(ParseError) as err:
            parse_query(text, kind, "fewshot", None)
        assert err.value.reason == reason
    chat = parse_query('{"task": "Find answers", "query": "Why?"}', kind, "chat", None)
    assert chat == {"task": "Find answers", "query": "Why?"}

"""Records, readers, homogeneous weighted sampling and collation."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llmembed.losses import CoSENT, InfoNCE
from llmembed.data import DataError, read_jsonl
from llmembed.data.collate import ContrastiveCollator, LoadedDataset
from llmembed.data.readers import ReadReport
from llmembed.data.sampling import BatchRef, HomogeneousBatchSampler
from llmembed.data.schema import Record, is_plain_text
from llmembed.serving import ServingContract
from llmembed.tokenization import EmbeddingTokenizer

GOOD = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")
    return path


@pytest.mark.parametrize("bad,message", [
    ("{not json", "malformed JSON"),
    ({"positive": "p"}, "field 'query': missing"),
    ({"query": "q", "positive": []}, "field 'positive': empty list"),
    ({"query": "q", "positive": "  "}, "field 'positive': empty text"),
    ({"query": 3, "positive": "p"}, "field 'query': expected a string, got int"),
    ({"query": "q", "positive": "p", "negatives": "n", "score": "high"}, "field 'score'"),
    ({"query": "q", "positive": "p", "negatives": [1]}, "field 'negatives[0]'"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": " "}, "field 'text': empty text"),
    ({"text": "t", "txet": "u"}, "field 'txet': unknown key for the text layout; did you mean 'text'?"),
])
def test_bad_records_name_file_line_and_field(tmp_path, bad, message):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    report = ReadReport()
    records = read_jsonl(path, skip_invalid=True, report=report)
    assert len(records) == 3 and report.kept == 3 and report.skipped_total == 1


def test_layouts_are_normalised(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"query": "a", "positive": ["p1", "p2"], "negatives": ["n"], "instruction": "I", "task": "t", "score": None},
        {"anchor": "b", "positive": "p", "negative": "n"},
        {"query": "c", "pos": ["p"], "neg": ["n1", "n2"]},
        {"query": "d", "positive": "p", "score": 4.5},
        {"text": "an unlabelled sentence", "meta": {"source": "wiki"}},
        {"query": "same", "positive": "same"},  # a labelled pair that repeats its query: not unlabelled text
    ])
    a, b, c, d, e, f = read_jsonl(path)
    assert (e.query, e.positives, e.negatives, e.meta) == ("an unlabelled sentence", ["an unlabelled sentence"], [],
                                                           {"source": "wiki"})
    assert is_plain_text(e) and not any(is_plain_text(r) for r in (a, b, c, d, f))
    assert e.to_json() == {"text": "an unlabelled sentence", "meta": {"source": "wiki"}}
    assert (a.query, a.positives, a.negatives, a.instruction, a.task) == ("a", ["p1", "p2"], ["n"], "I", "t")
    assert (b.query, b.positives, b.negatives) == ("b", ["p"], ["n"])
    assert (c.query, c.positives, c.negatives) == ("c", ["p"], ["n1", "n2"])
    assert d.score == 4.5 and d.negatives == []


def test_every_batch_is_homogeneous_and_follows_the_weights():
    sampler = HomogeneousBatchSampler([400, 200, 100], [1.0, 2.0, 1.0], global_batch_size=8, seed=5)
    counts = Counter()
    for _, ref in zip(range(4000), sampler.batches()):
        counts[ref.dataset] += 1
        assert len(ref.indices) == 8 and len(set(ref.indices)) == 8
        assert max(ref.indices) < [400, 200, 100][ref.dataset]
    assert abs(counts[0] / 4000 - 0.25) < 0.03
    assert abs(counts[1] / 4000 - 0.50) < 0.03
    assert abs(counts[2] / 4000 - 0.25) < 0.03


def test_ranks_split_the_single_process_batch_and_epochs_reshuffle():
    one = HomogeneousBatchSampler([64, 40], [1, 1], 8, seed=2)
    ranks = [HomogeneousBatchSampler([64, 40], [1, 1], 8, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 3, 11, 12, 40):
        full = next(one.batches(step))
        halves = [next(s.batches(step)) for s in ranks]
        assert halves[0].dataset == halves[1].dataset == full.dataset
        assert halves[0].indices + halves[1].indices == full.indices
    epoch0 = [next(one.batches(s)).indices for s in range(one.steps_per_epoch)]
    epoch1 = [next(one.batches(s + one.steps_per_epoch)).indices for s in range(one.steps_per_epoch)]
    assert epoch0 != epoch1
    # Within one dataset's pass no row repeats.
    seen = [i for s in range(one.steps_per_epoch) for i in next(one.batches(s)).indices
            if next(one.batches(s)).dataset == 0]
    assert len(seen) == len(set(seen))


def test_shared_datasets_give_every_rank_the_same_rows_and_the_others_split():
    """Conan's balancing: dataset 0 (shared) hands each rank the same 4 rows, as one process with
    batch 4 would; dataset 1 keeps 8 distinct rows split over the ranks."""
    ranks = [HomogeneousBatchSampler([64, 40], [1, 1], 8, seed=2, rank=r, world_size=2, shared=[True, False])
             for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 64 // 4 + 40 // 8
    kinds = set()
    for step in range(40):
        a, b = (next(s.batches(step)) for s in ranks)
        assert a.dataset == b.dataset
        kinds.add(a.dataset)
        if a.dataset == 0:
            assert a.indices == b.indices and len(a.indices) == 4
        else:
            assert len(a.indices) == len(b.indices) == 4 and not set(a.indices) & set(b.indices)
    assert kinds == {0, 1}
    one = HomogeneousBatchSampler([64], [1], 4, seed=2)
    only_shared = [HomogeneousBatchSampler([64], [1], 8, seed=2, rank=r, world_size=2, shared=[True]) for r in (0, 1)]
    for step in (0, 5, 17):
        assert next(only_shared[0].batches(step)).indices == next(only_shared[1].batches(step)).indices \
            == next(one.batches(step)).indices


def test_sampler_refuses_bad_settings():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        HomogeneousBatchSampler([4], [1], 8)
    with pytest.raises(ValueError, match="divisible"):
        HomogeneousBatchSampler([40], [1], 9, world_size=2)


@pytest.fixture(scope="module")
def text_tokenizer(default_dir):
    """The real tokenizer path the trainer uses: SmolLM2's tokenizer under a serving contract."""
    from transformers import AutoTokenizer

    return EmbeddingTokenizer(AutoTokenizer.from_pretrained(default_dir), ServingContract(max_length=64))


def _texts(tok: EmbeddingTokenizer, inputs: dict) -> list[str]:
    """The texts a tokenized batch holds (padding and EOS dropped)."""
    rows = [ids[mask.bool()] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    return [tok.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def test_ranks_sharing_queries_draw_the_same_positive_and_distinct_negatives(text_tokenizer):
    records = [Record(f"q{i}", [f"p{i}a", f"p{i}b"], [f"n{i}_{j}" for j in range(4)]) for i in range(4)]
    ds = LoadedDataset("d", records, None, True, 3, InfoNCE, shared_queries=True)
    groups = [_texts(text_tokenizer, ContrastiveCollator(text_tokenizer, [ds], seed=1, rank=r, world_size=2)(
        BatchRef(0, (0, 1, 2, 3), epoch=0, step=0))["passage"]) for r in (0, 1)]
    for i in range(4):
        mine, theirs = groups[0][3 * i : 3 * i + 3], groups[1][3 * i : 3 * i + 3]
        assert mine[0] == theirs[0] and mine[0] in (f"p{i}a", f"p{i}b")
        assert sorted(mine[1:] + theirs[1:]) == [f"n{i}_{j}" for j in range(4)]  # a share each, no overlap


def test_groups_hold_positive_then_fresh_hard_negatives(text_tokenizer):
    records = [Record(f"q{i}", [f"p{i}"], [f"n{i}_{j}" for j in range(5)]) for i in range(6)]
    records.append(Record("q6", ["p6"], ["only"]))
    records.append(Record("q7", ["p7"], []))
    ds = LoadedDataset("d", records, "Do it", True, 3, InfoNCE)
    collate = ContrastiveCollator(text_tokenizer, [ds], seed=0)
    batch = collate(BatchRef(0, (0, 6, 7), epoch=0, step=0))
    assert _texts(text_tokenizer, batch["query"]) == [f"Instruct: Do it\nQuery: {q}" for q in ("q0", "q6", "q7")]
    prefix = text_tokenizer.prompt_length("Instruct: Do it\nQuery: ")
    assert batch["query"]["prompt_lengths"].tolist() == [prefix] * 3 and prefix > 0
    passages = _texts(text_tokenizer, batch["passage"])
    assert len(passages) == 9 and batch["passage"]["prompt_lengths"].tolist() == [0] * 9
    assert passages[0] == "p0" and set(passages[1:3]) <= {f"n0_{j}" for j in range(5)} and passages[1] != passages[2]
    assert passages[3:6] == ["p6", "only", "only"]
    assert passages[6] == "p7" and all(p.startswith("p") and p != "p7" for p in passages[7:9])
    assert batch["dataset"] == 0 and batch["passage"]["input_ids"].shape[0] == 3 * batch["query"]["input_ids"].shape[0]
    assert "scores" not in batch and "loss" not in batch
    again = collate(BatchRef(0, (0, 6, 7), epoch=0, step=0))["passage"]
    assert _texts(text_tokenizer, again) == passages
    epochs = {tuple(_texts(text_tokenizer, collate(BatchRef(0, (0,), epoch=e, step=0))["passage"])[1:])
              for e in range(6)}
    assert len(epochs) > 1  # hard negatives are re-drawn each epoch


def test_training_lengths_cut_each_side_and_keep_eos(text_tokenizer):
    long = " ".join(f"word{i}" for i in range(200))
    ds = LoadedDataset("d", [Record(long, [long], [], score=1.0), Record("short", ["p"], [], score=0.0)],
                       None, True, 1, CoSENT)
    batch = ContrastiveCollator(text_tokenizer, [ds], query_max_length=24, passage_max_length=16)(
        BatchRef(0, (0, 1), epoch=0, step=0))
    assert batch["query"]["attention_mask"].sum(1).tolist()[0] == 24
    assert batch["passage"]["attention_mask"].sum(1).tolist()[0] == 16
    eos = text_tokenizer.eos_id
    assert batch["query"]["input_ids"][0, -1] == eos and batch["passage"]["input_ids"][0, -1] == eos  # left padded
    assert batch["scores"].tolist() == [1.0, 0.0]
    # Without training cuts both sides run to the serving length.
    full = ContrastiveCollator(text_tokenizer, [ds])(BatchRef(0, (0, 1), epoch=0, step=0))
    assert full["query"]["attention_mask"].sum(1).tolist()[0] == 64
    with pytest.raises(ValueError, match="query_max_length=65 must be between 2 and the model's max_length"):
        ContrastiveCollator(text_tokenizer, [ds], query_max_length=65)


def test_distillation_groups_carry_the_teachers_scores_of_the_drawn_negatives(text_tokenizer):
    from llmembed.data.collate import teacher_scores

    def mined(i, k):
        negatives = [f"n{i}_{j}" for j in range(k)]
        meta = {"mining": {"positive_score": 0.9, "negative_scores": [round(0.1 * j, 1) for j in range(k)],
                           "reranker_positive_score": 0.8, "reranker_negative_scores": [0.05 * j for j in range(k)]}}
        return Record(f"q{i}", [f"p{i}"], negatives, meta=meta)

    records = [mined(i, 5) for i in range(4)] + [mined(4, 1), Record("q5", ["p5"], [])]
    ds = LoadedDataset("d", records, None, True, 3, InfoNCE, teacher_scores(records, "embedding", "d"))
    collate = ContrastiveCollator(text_tokenizer, [ds], seed=0)
    # A record mining left without negatives borrows unscored ones and sits out (NaN row).
    unscored = collate(BatchRef(0, (5, 0), epoch=0, step=0))["teacher_scores"]
    assert unscored[0].isnan().all() and not unscored[1].isnan().any()
    for epoch in range(3):
        batch = collate(BatchRef(0, (0, 2, 4), epoch=epoch, step=0))
        passages = _texts(text_tokenizer, batch["passage"])
        teacher = batch["teacher_scores"]
        assert teacher.shape == (3, 3)
        for row, group in enumerate((passages[0:3], passages[3:6], passages[6:9])):
            # Each score is the one mining gave that very text: n{i}_{j} scored 0.1 * j.
            expected = [0.9] + [0.1 * int(text.split("_")[1]) for text in group[1:]]
            assert teacher[row].tolist() == pytest.approx(expected)
    assert teacher_scores(records, "reranker", "d")[1][:3] == pytest.approx([0.8, 0.0, 0.05])


@pytest.mark.parametrize("meta,negatives,message", [
    ({}, ["n"], "meta.mining.positive_score is missing"),
    ({"mining": {"positive_score": 0.5, "negative_scores": [0.1]}}, ["a", "b"], "one score per negative"),
    ({"mining": {"positive_score": 0.5, "negative_scores": [None, 0.2]}}, ["a", "b"], "without a score"),
])
def test_records_without_usable_teacher_scores_are_refused_by_number(meta, negatives, message):
    from llmembed.data.collate import teacher_scores

    records = [Record("fine", ["p"], ["n"], meta={"mining": {"positive_score": 0.5, "negative_scores": [0.1]}}),
               Record("bad one", ["p"], negatives, meta=meta)]
    with pytest.raises(ValueError, match=rf"data\.datasets\[0\] \(x\.jsonl\): record 2 \(query 'bad one'\): .*{message}"):
        teacher_scores(records, "embedding", "data.datasets[0] (x.jsonl)")


def test_the_llm_judges_scores_are_read_from_meta_relabel():
    from llmembed.data.collate import teacher_scores

    relabelled = Record("q", ["p"], ["n1", "n2"], meta={"relabel": {"positive_score": -0.7, "negative_scores": [-2.0, -3.5]},
                                                        "mining": {"positive_score": 0.9, "negative_scores": [0.1, 0.2]}})
    assert teacher_scores([relabelled], "llm", "d")[0] == pytest.approx([-0.7, -2.0, -3.5])
    assert teacher_scores([relabelled], "embedding", "d")[0] == pytest.approx([0.9, 0.1, 0.2])
    mined_only = Record("q", ["p"], ["n1"], meta={"mining": {"positive_score": 0.9, "negative_scores": [0.1]}})
    with pytest.raises(ValueError, match=r"meta\.relabel\.positive_score is missing; write it with synth\.relabel"):
        teacher_scores([mined_only], "llm", "d")


def test_an_embedding_teacher_adds_its_cosines_of_the_raw_texts(text_tokenizer):
    import numpy as np

    from llmembed.serve.encoders import load_encoder, reference_model_dir

    teacher = load_encoder(reference_model_dir())
    records = [Record("how do plants eat", ["By photosynthesis."], ["Cats sleep a lot."]),
               Record("capital of France", ["Paris."], ["Bananas are yellow."])]
    ds = LoadedDataset("d", records, "Retrieve", True, 2, InfoNCE)
    batch = ContrastiveCollator(text_tokenizer, [ds], teacher_encoder=teacher)(BatchRef(0, (0, 1), epoch=0, step=0))
    passages = ["By photosynthesis.", "Cats sleep a lot.", "Paris.", "Bananas are yellow."]
    expected = teacher.encode_queries([r.query for r in records]) @ teacher.encode_passages(passages).T
    similarity = (batch["teacher_query"] @ batch["teacher_passage"].T).numpy()
    assert similarity.shape == (2, 4) and np.allclose(similarity, expected, atol=1e-6)
    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 2] > similarity[1, 3]  # the teacher knows

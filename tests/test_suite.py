"""The offline suite: its numbers are mteb's own and agree with sentence-transformers'
evaluators; the mteb adapter gives queries their task's instruction and documents none; an
export scored through sentence-transformers matches the same model scored through llmembed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmembed.serve.encoders import load_encoder, reference_model_dir
from llmembed.evaluate import runner
from llmembed.evaluate.suite import SUITE, build_tasks, chatterbot_heldout, lee_pairs, pang_lee_sentences


def test_the_packaged_data_is_what_the_suite_says():
    first, second, scores = lee_pairs()
    assert len(first) == len(second) == len(scores) == 1225
    assert 0.0 <= min(scores) and max(scores) <= 1.0
    texts, labels = pang_lee_sentences()
    assert len(texts) == 200 and sorted(set(labels)) == [0, 1] and sum(labels) == 100
    english, chinese = chatterbot_heldout("english"), chatterbot_heldout("chinese")
    assert len(english.queries) == 154 and len(chinese.queries) > 50
    tasks, instructions = build_tasks()
    assert [t.metadata.name for t in tasks] == list(SUITE) and all(instructions[n] for n in SUITE)


@pytest.mark.integration
def test_suite_scores_equal_mteb_with_its_own_wrapper_and_st_evaluators():
    """all-MiniLM-L6-v2 through our adapter, through mteb's own SentenceTransformer wrapper and
    through sentence-transformers' evaluators: the same numbers to 1e-4."""
    import mteb
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator, InformationRetrievalEvaluator

    ours = runner.run(load_encoder(reference_model_dir()))
    model = SentenceTransformer(str(reference_model_dir()), device="cpu")
    tasks, _ = build_tasks()
    theirs = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False, overwrite_strategy="always")
    for task, result in zip(tasks, theirs.task_results, strict=True):
        values = result.scores[task.metadata.eval_splits[0]][0]
        for key, value in ours[task.metadata.name].items():
            assert abs(value - values[key]) < 1e-4, (task.metadata.name, key, value, values[key])

    first, second, scores = lee_pairs()
    sts = EmbeddingSimilarityEvaluator(first, second, scores, name="lee")(model)
    assert abs(ours["LeeDocSim"]["cosine_spearman"] - sts["lee_spearman_cosine"]) < 1e-4
    assert abs(ours["LeeDocSim"]["cosine_pearson"] - sts["lee_pearson_cosine"]) < 1e-4
    for name, language in (("ChatterbotRetrieval.en", "english"), ("ChatterbotRetrieval.zh", "chinese")):
        split = chatterbot_heldout(language).as_mteb()
        evaluator = InformationRetrievalEvaluator(
            {r["id"]: r["text"] for r in split["queries"]}, {r["id"]: r["text"] for r in split["corpus"]},
            {q: set(d) for q, d in split["relevant_docs"].items()}, name="ir", show_progress_bar=False)
        st = evaluator(model)
        for ours_key, st_key in (("ndcg_at_10", "ir_cosine_ndcg@10"), ("mrr_at_10", "ir_cosine_mrr@10"),
                                 ("recall_at_10", "ir_cosine_recall@10")):
            assert abs(ours[name][ours_key] - st[st_key]) < 1e-4, (name, ours_key)
    # The yardstick itself, as measured before: a real retrieval model, far from chance.
    assert ours["ChatterbotRetrieval.en"]["ndcg_at_10"] > 0.7


def test_adapter_gives_queries_the_task_instruction_and_documents_none(tiny_llama_dir, tmp_path):
    from mteb.types import PromptType

    from llmembed.evaluate.mteb_adapter import MTEBEncoder

    from .test_export import trained_model

    trained_model(tiny_llama_dir, "mean", False).save(tmp_path / "m")
    encoder = load_encoder(tmp_path / "m")
    tasks, instructions = build_tasks(["ChatterbotRetrieval.en"])
    adapter = MTEBEncoder(encoder, instructions)
    texts = ["how are you", "what is a computer"]
    loader = [{"text": texts}]
    meta = tasks[0].metadata
    queries = adapter.encode(loader, task_metadata=meta, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.query)
    documents = adapter.encode(loader, task_metadata=meta, hf_split="test", hf_subset="default",
                               prompt_type=PromptType.document)
    model = encoder.model
    expected_q = model.encode(texts, instructions["ChatterbotRetrieval.en"])
    expected_d = model.encode(texts, is_query=False)
    np.testing.assert_allclose(queries, expected_q / np.linalg.norm(expected_q, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(documents, expected_d / np.linalg.norm(expected_d, axis=1, keepdims=True), atol=1e-6)
    assert np.abs(queries - documents).max() > 1e-3  # the instruction changed the query vectors


def test_an_export_scores_the_same_through_sentence_transformers(tiny_llama_dir, tmp_path):
    from llmembed.serve.export import export

    from .test_export import trained_model

    trained_model(tiny_llama_dir, "last_token", False).save(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "e", verify=False)
    ours = load_encoder(tmp_path / "e")
    served = load_encoder(tmp_path / "e", backend="sentence-transformers")
    assert (ours.kind, served.kind) == ("llmembed", "sentence-transformers")
    texts = ["how are you", "what is a computer", "tell me a joke about cats"]
    instruction = "Given a question, retrieve the answer to it"
    for a, b in ((ours.encode_queries(texts, instruction), served.encode_queries(texts, instruction)),
                 (ours.encode_queries(texts, [instruction, None, instruction]),
                  served.encode_queries(texts, [instruction, None, instruction])),
                 (ours.encode_passages(texts), served.encode_passages(texts))):
        assert (a * b).sum(axis=1).min() > 0.9999


def test_a_sentence_transformers_folder_gets_its_own_query_prompt(tiny_llama_dir, tmp_path):
    """A model that names a "query" prompt (as E5 or BGE do) is scored with it on queries and
    its "document" prompt on passages, the way its authors serve it."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from llmembed.serve.encoders import load_encoder

    transformer = Transformer(str(tiny_llama_dir), max_seq_length=32)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"),
                                         Normalize()], device="cpu",
                                prompts={"query": "query: ", "document": "passage: "})
    model.save(str(tmp_path / "st"))
    encoder = load_encoder(tmp_path / "st")
    texts = ["how tall is the tower?"]
    got_q, got_p = encoder.encode_queries(texts, "any task"), encoder.encode_passages(texts)
    assert np.allclose(got_q, model.encode(texts, prompt_name="query"), atol=1e-5)
    assert np.allclose(got_p, model.encode(texts, prompt_name="document"), atol=1e-5)
    assert not np.allclose(got_q, model.encode(texts), atol=1e-3)


def test_held_out_records_are_scored_with_each_records_own_instruction(tiny_llama_dir, tmp_path):
    """As mining and training read them: a record's instruction goes with its query (none: the
    model's default), so the task's query vectors are each query encoded with its own record's
    instruction; a query given two instructions is refused, naming the record."""
    from mteb.types import PromptType

    from llmembed.evaluate.mteb_adapter import MTEBEncoder
    from llmembed.evaluate.suite import SuiteError, records_heldout

    from .test_export import trained_model

    trained_model(tiny_llama_dir, "mean", False).save(tmp_path / "m")
    encoder = load_encoder(tmp_path / "m")
    topics = ["cats", "rivers", "trains", "bread", "music", "stars", "chess", "rain"]
    instructions = ["Retrieve facts about animals", None, "zzz qqq xxx", "Find recipes"] * 2
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"query": f"tell me about {t}", "positive": f"A passage on {t}.",
                                        **({"instruction": i} if i else {})}) + "\n"
                            for t, i in zip(topics, instructions)))
    queries = [f"tell me about {t}" for t in topics]
    assert records_heldout(path).instruction == dict(zip(queries, instructions))
    [task], by_task = build_tasks([], [path])
    vectors = MTEBEncoder(encoder, by_task).encode([{"text": queries}], task_metadata=task.metadata,
                                                   hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    model = encoder.model
    expected = np.concatenate([model.encode([q], i if i is not None else model.contract.prompts.default_instruction)
                               for q, i in zip(queries, instructions)])
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    one = model.encode(queries, "Retrieve facts about animals")  # what a single file-wide instruction gives
    assert np.abs(vectors[1:4] - one[1:4] / np.linalg.norm(one[1:4], axis=1, keepdims=True)).max() > 1e-3
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"query": "q", "positive": "p", "instruction": "A"}) + "\n"
                     + json.dumps({"query": "q", "positive": "p2", "instruction": "B"}) + "\n")
    with pytest.raises(SuiteError, match="record 2: query 'q' appears earlier with another instruction"):
        records_heldout(clash)

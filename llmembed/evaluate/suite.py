"""The offline evaluation suite: real labelled data shipped in PyPI packages, as local mteb tasks.

No download: the data comes from installed packages (``../shared/DESIGN.md``), and each task
is an mteb task whose ``load_data`` reads it, so every number comes from mteb's own metric code.

- ``LeeDocSim`` (STS): the Lee et al. (2005) news-document similarity set from gensim's test
  data, 50 documents and 1,225 pairs rated by people; Pearson and Spearman of the cosine.
- ``PangLeePolarity`` (classification): 200 movie-review sentences from gensim's test data,
  logistic regression on the embeddings, cross-validated accuracy (mteb's protocol).
- ``ChatterbotRetrieval.en`` / ``.zh`` (retrieval): chatterbot-corpus question -> answer on the
  held-out split that ``llmembed.data.packaged`` keeps out of training; every held-out answer is
  the corpus; nDCG@10, MRR@10, Recall@10.
- ``RecordsRetrieval`` (retrieval): any held-out JSONL of records (e.g. synthetic data), the
  same way.

Each task declares the instruction its queries get (documents get none, E5 convention).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmembed.data import read_jsonl
from llmembed.data.packaged import INSTRUCTION as CHATTERBOT_INSTRUCTION
from llmembed.data.packaged import chatterbot_pairs, split

INSTRUCTIONS = {
    "LeeDocSim": "Retrieve news articles that are similar to the given article",
    "PangLeePolarity": "Classify the sentiment of a given movie review sentence as positive or negative",
    "ChatterbotRetrieval.en": CHATTERBOT_INSTRUCTION,
    "ChatterbotRetrieval.zh": CHATTERBOT_INSTRUCTION,
}
SUITE = ("LeeDocSim", "PangLeePolarity", "ChatterbotRetrieval.en", "ChatterbotRetrieval.zh")
# The score each task is ranked by (mteb's key) and the extra scores the table shows.
REPORTED = {
    "STS": ("cosine_spearman", ("cosine_pearson",)),
    "Classification": ("accuracy", ()),
    "Retrieval": ("ndcg_at_10", ("mrr_at_10", "recall_at_10", "recall_at_1")),
}


class SuiteError(ValueError):
    """A suite input is missing or wrong; the message names it."""


def gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SuiteError("the offline suite's Lee and Pang-Lee sets come from the PyPI package gensim "
                         "(pip install gensim==4.4.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def lee_pairs() -> tuple[list[str], list[str], list[float]]:
    """The 1,225 document pairs (upper triangle of the 50 x 50 human similarity matrix)."""
    folder = gensim_test_data()
    documents = [line.strip() for line in (folder / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    rows = [[float(x) for x in line.split()] for line in (folder / "similarities0-1.txt").read_text().splitlines()
            if line.strip()]
    if len(documents) != 50 or len(rows) != 50:
        raise SuiteError(f"{folder}: expected 50 Lee documents and a 50 x 50 similarity matrix")
    first, second, scores = [], [], []
    for i in range(50):
        for j in range(i + 1, 50):
            first.append(documents[i])
            second.append(documents[j])
            scores.append(rows[i][j])
    return first, second, scores


def pang_lee_sentences() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for line in (gensim_test_data() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        if not line.strip():
            continue
        label, text = line.split(" ", 1)
        texts.append(text.strip())
        labels.append(1 if label == "__label__pos" else 0)
    return texts, labels


# A task's query instruction: one for every query, or one per query text (records that carry
# their own); None is the model's default instruction.
Instruction = str | None | dict[str, str | None]


@dataclass
class RetrievalData:
    queries: list[str]
    positives: list[str]
    instruction: Instruction = None

    def as_mteb(self) -> dict[str, Any]:
        """mteb's split: queries, the corpus (each distinct positive once) and qrels."""
        from datasets import Dataset

        corpus_ids: dict[str, str] = {}
        for text in self.positives:
            corpus_ids.setdefault(text, f"d{len(corpus_ids)}")
        return {
            "queries": Dataset.from_list([{"id": f"q{i}", "text": q} for i, q in enumerate(self.queries)]),
            "corpus": Dataset.from_list([{"id": cid, "text": text} for text, cid in corpus_ids.items()]),
            "relevant_docs": {f"q{i}": {corpus_ids[p]: 1} for i, p in enumerate(self.positives)},
            "top_ranked": None,
        }


def chatterbot_heldout(language: str) -> RetrievalData:
    _, heldout = split(chatterbot_pairs(language))
    if not heldout:
        raise SuiteError(f"chatterbot-corpus {language}: no held-out pairs")
    return RetrievalData([r["query"] for r in heldout], [r["positive"] for r in heldout], CHATTERBOT_INSTRUCTION)


def records_heldout(path: str | Path) -> RetrievalData:
    records = read_jsonl(path)
    if not records:
        raise SuiteError(f"{path}: no records to evaluate")
    # Each query with its own record's instruction, as mining and training read it.
    by_query: dict[str, str | None] = {}
    for number, record in enumerate(records, start=1):
        if by_query.setdefault(record.query, record.instruction) != record.instruction:
            raise SuiteError(f"{path}: record {number}: query {record.query[:40]!r} appears earlier with another "
                             "instruction; a query is scored with one")
    distinct = set(by_query.values())
    instruction: Instruction = distinct.pop() if len(distinct) == 1 else by_query
    return RetrievalData([r.query for r in records], [r.positives[0] for r in records], instruction)


def _metadata(name: str, task_type: str, main_score: str, languages: list[str], description: str,
              splits: list[str]) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, type=task_type, main_score=main_score, description=description,
        reference="https://github.com/llmembed/llmembed", dataset={"path": "local", "revision": "local"},
        category="t2t", eval_splits=splits, eval_langs=languages, date=("2000-01-01", "2020-01-01"),
        dialect=["Written"], domains=[], task_subtypes=[], license="not specified", annotations_creators="human-annotated",
        modalities=["text"], sample_creation="found", bibtex_citation="",
    )


def lee_task():
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    class LeeDocSim(AbsTaskSTS):
        metadata = _metadata("LeeDocSim", "STS", "cosine_spearman", ["eng-Latn"],
                             "Lee et al. (2005) news-document similarity, human ratings (gensim test data)", ["test"])
        min_score = 0
        max_score = 1

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            first, second, scores = lee_pairs()
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": first, "sentence2": second, "score": scores})})
            self.data_loaded = True

    return LeeDocSim()


def pang_lee_task():
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification

    class PangLeePolarity(AbsTaskClassification):
        metadata = _metadata("PangLeePolarity", "Classification", "accuracy", ["eng-Latn"],
                             "Pang and Lee sentence polarity, 200 sentences (gensim test data)", ["train"])
        is_cross_validation = True

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            texts, labels = pang_lee_sentences()
            self.dataset = DatasetDict({"train": Dataset.from_dict({"text": texts, "label": labels})})
            self.data_loaded = True

    return PangLeePolarity()


def retrieval_task(name: str, data: RetrievalData, languages: list[str], description: str):
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(name, "Retrieval", "ndcg_at_10", languages, description, ["test"])

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {"test": data.as_mteb()}}
            self.data_loaded = True

    LocalRetrieval.__name__ = LocalRetrieval.__qualname__ = name.replace(".", "_")
    return LocalRetrieval()


def build_tasks(names: Sequence[str] = SUITE,
                records: Sequence[str | Path] = ()) -> tuple[list[Any], dict[str, Instruction]]:
    """The suite's mteb tasks (``names``, plus one ``RecordsRetrieval`` task per JSONL file in
    ``records``) and the instruction of each task's queries."""
    tasks, instructions = [], {}
    for name in names:
        if name == "LeeDocSim":
            tasks.append(lee_task())
        elif name == "PangLeePolarity":
            tasks.append(pang_lee_task())
        elif name == "ChatterbotRetrieval.en":
            tasks.append(retrieval_task(name, chatterbot_heldout("english"), ["eng-Latn"],
                                        "chatterbot-corpus English question -> answer, held-out split"))
        elif name == "ChatterbotRetrieval.zh":
            tasks.append(retrieval_task(name, chatterbot_heldout("chinese"), ["cmn-Hans"],
                                        "chatterbot-corpus Chinese question -> answer, held-out split"))
        else:
            raise SuiteError(f"unknown suite task {name!r}; known: {', '.join(SUITE)}")
        instructions[name] = INSTRUCTIONS[name]
    for path in records:
        data = records_heldout(path)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
        name = f"RecordsRetrieval.{Path(path).stem}.{digest}"
        tasks.append(retrieval_task(name, data, ["eng-Latn"], f"held-out records from {Path(path).name}"))
        instructions[name] = data.instruction  # None: the model's default instruction
    return tasks, instructions

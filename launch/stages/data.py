"""Real pairs and the files the other stages read: the packaged chatterbot pairs, their answers
as a corpus for the generator, and one training file of every source."""

from __future__ import annotations

import json
from pathlib import Path

from llmembed.data.readers import json_lines
from llmembed.outputs import write_text
from launch.stages.runner import PY, Job, Stage, count_records


def chatterbot(job: Job) -> Path:
    """The chatterbot-corpus pairs (packaged): ``train.jsonl`` and ``heldout.jsonl`` in the folder returned."""
    folder = job.data / "chatterbot"
    job.run(Stage("data", [[PY, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(folder), "--overwrite"]],
                  outputs=(folder / "train.jsonl", folder / "heldout.jsonl")))
    return folder


def write_answers_corpus(train: Path, target: Path) -> None:
    """The training pairs' answers as a corpus of passages: no question reaches the generator."""
    rows = [record for _, record in json_lines(train)]
    write_text(target, "".join(json.dumps({"id": f"answer{n}", "text": r["positive"]}, ensure_ascii=False) + "\n"
                               for n, r in enumerate(rows)))
    print(f"{target}: {len(rows)} passages")


def answers_corpus(job: Job, train: Path) -> Path:
    corpus = job.data / "chatterbot_answers.jsonl"
    job.run(Stage("corpus", call=write_answers_corpus, args=(train, corpus), inputs=(train,), outputs=(corpus,)))
    return corpus


def concatenate(target: Path, *sources: Path) -> None:
    """The sources' records, file after file, in one file."""
    text = "".join(p.read_text(encoding="utf-8") for p in sources)
    write_text(target, text)
    print(f"{target}: {count_records(target)} records from {len(sources)} files")


def combine(job: Job, sources: list[Path]) -> Path:
    """One training file: synthetic and real pairs share batches (a record without hard
    negatives borrows other records' positives)."""
    mixed = job.data / "train_mixed.jsonl"
    job.run(Stage("combine", call=concatenate, args=(mixed, *sources), inputs=tuple(sources), outputs=(mixed,)))
    return mixed

"""Run suite tasks through mteb for one or more models and render the scores as a table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmembed.serve.encoders import TextEncoder
from llmembed.evaluate.suite import REPORTED, SUITE, build_tasks

Scores = dict[str, dict[str, float]]  # task -> metric -> value


def run(encoder: TextEncoder, names: Sequence[str] = SUITE, records: Sequence[str | Path] = ()) -> Scores:
    """mteb's scores of ``encoder`` on the named suite tasks (and held-out record files):
    the main score of each task plus the extras in :data:`REPORTED`."""
    import mteb

    from llmembed.evaluate.mteb_adapter import MTEBEncoder

    tasks, instructions = build_tasks(names, records)
    result = mteb.evaluate(MTEBEncoder(encoder, instructions), tasks, cache=None, show_progress_bar=False,
                           overwrite_strategy="always")
    scores: Scores = {}
    for task, task_result in zip(tasks, result.task_results, strict=True):
        main, extras = REPORTED[task.metadata.type]
        split = task.metadata.eval_splits[0]
        values = task_result.scores[split][0]
        scores[task.metadata.name] = {key: float(values[key]) for key in (main, *extras)}
    return scores


def main_score(scores: dict[str, float]) -> float:
    """A task's ranking score: :func:`run` puts it first."""
    return next(iter(scores.values()))


def average(scores: Scores) -> float:
    values = [main_score(s) for s in scores.values()]
    return sum(values) / len(values) if values else math.nan


def table(rows: dict[str, Scores], reference: str | None = None) -> str:
    """One row per model: each task's main score, the average, and (with ``reference``) each
    row's average as a share of the reference row's."""
    tasks = list(dict.fromkeys(t for scores in rows.values() for t in scores))
    headers = [_short(t) for t in tasks] + ["average"]
    width = max([len(name) for name in rows] + [5])
    lines = ["  ".join([f"{'model':<{width}}", *[f"{h:>12}" for h in headers]])]
    for name, scores in rows.items():
        cells = [f"{main_score(scores[t]):>12.4f}" if t in scores else f"{'-':>12}" for t in tasks]
        lines.append("  ".join([f"{name:<{width}}", *cells, f"{average(scores):>12.4f}"]))
    if reference is not None and reference in rows:
        ref = rows[reference]
        lines.append("")
        lines.append(f"share of {reference} per task:")
        for name, scores in rows.items():
            if name == reference:
                continue
            cells = [f"{main_score(scores[t]) / main_score(ref[t]):>12.3f}"
                     if t in scores and t in ref and main_score(ref[t]) else f"{'-':>12}" for t in tasks]
            lines.append("  ".join([f"{name:<{width}}", *cells, f"{average(scores) / average(ref):>12.3f}"]))
    legend = ", ".join(f"{_short(t)}={REPORTED_NAME.get(t, 'main score')}" for t in tasks)
    return "\n".join(lines + ["", f"scores: {legend}"])


REPORTED_NAME = {"LeeDocSim": "Spearman", "PangLeePolarity": "accuracy", "ChatterbotRetrieval.en": "nDCG@10",
                 "ChatterbotRetrieval.zh": "nDCG@10"}


def _short(task: str) -> str:
    return {"LeeDocSim": "Lee", "PangLeePolarity": "PangLee", "ChatterbotRetrieval.en": "chat-en",
            "ChatterbotRetrieval.zh": "chat-zh"}.get(task, task.split(".")[1] if task.startswith("RecordsRetrieval.")
                                                      else task)[:12]


def as_json(rows: dict[str, Scores], models: dict[str, Any]) -> dict[str, Any]:
    return {"models": models, "scores": rows, "average": {name: average(s) for name, s in rows.items()}}

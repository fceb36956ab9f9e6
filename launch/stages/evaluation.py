"""The offline suite (plus the synthetic held-out split when there is one) for the reference
(all-MiniLM-L6-v2), the untrained configuration and the trained model; and the job's report."""

from __future__ import annotations

import json
from pathlib import Path

from llmembed.evaluate import runner
from launch.stages.runner import PY, Job, Stage


def heldout_records(heldout: Path) -> list[str]:
    """The evaluate command's ``--data`` for a synthetic held-out split, if it has pairs."""
    return ["--data", str(heldout)] if heldout.stat().st_size else []


def evaluate(job: Job, model: Path, heldout: Path) -> Path:
    scores = job.out / "scores.json"
    job.run(Stage("evaluate", [[PY, "-m", "llmembed.evaluate", "--model", str(model), "--suite", "offline",
                                *heldout_records(heldout), "--reference", "--baseline", "--json", str(scores),
                                "--overwrite"]],
                  inputs=(model, heldout), outputs=(scores,)))
    return scores


def report(job: Job, trained_scores: Path, served_scores: Path) -> None:
    """The scores table (the served export beside the trained model), the averages with and
    without the synthetic held-out task, and each stage's wall time."""
    trained = json.loads(trained_scores.read_text())
    served = json.loads(served_scores.read_text())
    rows = dict(trained["scores"])
    for name, scores in served["scores"].items():
        rows[f"{name} via sentence-transformers"] = scores
    reference = next(n for n, m in trained["models"].items() if m["kind"] == "sentence-transformers")
    print()
    print(runner.table(rows, reference))
    suite_only = {n: {t: s for t, s in r.items() if not t.startswith("RecordsRetrieval.")} for n, r in rows.items()}
    print("\naverage over the suite without / with the synthetic held-out task:")
    for name in rows:
        print(f"  {name:<40} {runner.average(suite_only[name]):.4f} / {runner.average(rows[name]):.4f}")
    print("\nwall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in job.times.items()))

"""Shipping: the export (checked by ``llmembed.serve.verify`` on every serving path), the
export scored again through sentence-transformers, and one question answered by the reloaded
export."""

from __future__ import annotations

from pathlib import Path

from llmembed.data.readers import json_lines
from launch.stages.evaluation import heldout_records
from launch.stages.runner import PY, REPO, Job, Stage

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def export(job: Job, model: Path) -> Path:
    """The export; verify also runs real vLLM when the second environment is built."""
    folder = job.out / "export"
    vllm = [f"--vllm-python={VLLM_PYTHON}"] if VLLM_PYTHON.is_file() else []
    job.run(Stage("export", [[PY, "-m", "llmembed.serve.export", "--model", str(model), "--out", str(folder),
                              "--overwrite", *vllm]], inputs=(model,), outputs=(folder,)))
    return folder


def serve(job: Job, folder: Path, heldout: Path) -> Path:
    """The export's suite scores through plain sentence-transformers."""
    scores = job.out / "scores_export_st.json"
    job.run(Stage("serve", [[PY, "-m", "llmembed.evaluate", "--model", str(folder), "--backend", "sentence-transformers",
                             "--suite", "offline", *heldout_records(heldout), "--json", str(scores), "--overwrite"]],
                  inputs=(folder, heldout), outputs=(scores,)))
    return scores


def answer_one(folder: Path, records: Path) -> None:
    """Reload the export in plain sentence-transformers and answer the first held-out question
    among every held-out answer."""
    from sentence_transformers import SentenceTransformer  # loads slowly: only for this stage

    rows = [record for _, record in json_lines(records)]
    model = SentenceTransformer(str(folder), device="cpu")
    question = rows[0]["query"]
    answers = [r["positive"] for r in rows]
    scores = model.similarity(model.encode([question], prompt_name="query"), model.encode(answers))[0]
    best = int(scores.argmax())
    print(f"question: {question}\nanswer:   {answers[best]}  (cos {float(scores[best]):.3f}; "
          f"{'the labelled answer' if best == 0 else 'labelled: ' + answers[0]})")


def answer(job: Job, folder: Path, records: Path) -> None:
    job.run(Stage("answer", call=answer_one, args=(folder, records), inputs=(folder, records)))

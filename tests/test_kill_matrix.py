"""SIGKILL at varied moments of merge, mine and synth.merge: the rerun, with the same command,
gives output identical to an uninterrupted run, the inputs are untouched, and nothing is left
behind (no staging file or folder beside the output or in mine's cache)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmembed.outputs import STAGING_TAG

from .processes import kill_tree, run_group
from .test_export import trained_model
from .train_utils import write_pairs

pytestmark = pytest.mark.integration
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _checksums(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _staging(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if STAGING_TAG in p.name]


def _kill_when(cmd: list[str], moment, timeout: float = 300) -> bool:
    """Run ``cmd`` and SIGKILL its whole process group as soon as ``moment()`` is true; return
    whether it was killed then (False: the command ended before the moment came)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not moment() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        hit = proc.poll() is None
    finally:
        kill_tree(proc)
    assert not hit or proc.returncode == -signal.SIGKILL
    return hit


def _after(seconds: float):
    start = time.monotonic()
    return lambda: time.monotonic() - start >= seconds


def _staging_beside(out: Path):
    return lambda: any(STAGING_TAG in p.name for p in out.parent.iterdir())


def _fresh(folder: Path, leaf: str):
    """Outputs named ``leaf`` in a new subfolder of ``folder`` per run."""
    def make(name: str) -> Path:
        (folder / name).mkdir()
        return folder / name / leaf
    return make


def _check_kills(tmp_path, inputs: list[Path], command, out_of, moments) -> None:
    """For each moment: kill ``command(out)`` then, rerun it; compare with an uninterrupted run."""
    before = {p: _checksums(p) for p in inputs}
    reference = out_of("reference")
    run_group(command(reference), ENV, tmp_path, 600, "uninterrupted run")
    expected = {k.split("/", 1)[-1]: v for k, v in _checksums(reference).items()}
    for name, moment in moments.items():
        # A short moment (a few milliseconds of writing) can slip past the polling on a busy
        # machine: try again in a fresh place, and fail only if it is never caught.
        for attempt in range(5):
            out = out_of(f"{name}-{attempt}")
            if _kill_when(command(out), moment(out)) and not out.exists():
                break  # killed before its output was in place (after it, the run was as good as done)
        else:
            pytest.fail(f"the moment {name!r} was never caught in 5 runs")
        run_group(command(out), ENV, tmp_path, 600, f"rerun after a kill at {name}")
        assert {k.split("/", 1)[-1]: v for k, v in _checksums(out).items()} == expected, name
        assert not _staging(out.parent), (name, _staging(out.parent))
    assert {p: _checksums(p) for p in inputs} == before


@pytest.fixture(scope="module")
def models(tiny_llama_dir, module_tmp):
    folder = module_tmp("kill-models")
    for seed in (1, 2):
        model = trained_model(tiny_llama_dir, "mean", False)
        import torch

        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save(folder / f"run{seed}")
    return [folder / "run1", folder / "run2"]


def test_merge_killed_then_rerun(models, tmp_path):
    def command(out):
        return [sys.executable, "-m", "llmembed.merge", *map(str, models), "--out", str(out)]

    _check_kills(tmp_path, list(models), command, _fresh(tmp_path, "merged"),
                 {"writing": lambda out: _staging_beside(out)})


def test_mine_killed_then_rerun(models, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 48)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"corpus passage {i} on topic {i % 7}"}) + "\n"
                                                   for i in range(400)))
    inputs = [models[0], tmp_path / "pairs.jsonl", tmp_path / "corpus.jsonl"]

    def command(out):
        return [sys.executable, "-m", "llmembed.mine", "--model", str(models[0]), "--input", str(inputs[1]),
                "--corpus", str(inputs[2]), "--out", str(out), "--ranks", "0:20", "--num-negatives", "3",
                "--no-progress", "--batch-size", "8"]

    def corpus_cached(out):  # the corpus is encoded and cached, the queries not yet
        cache = out.with_name(out.name + ".cache")
        return lambda: any(cache.glob("corpus-*/chunk-*.npy"))

    _check_kills(tmp_path, inputs, command, _fresh(tmp_path, "mined.jsonl"),
                 {"encoding": corpus_cached, "writing": lambda out: _staging_beside(out)})


def test_synth_merge_killed_then_rerun(tmp_path):
    from synth.pipeline import Pipeline, Settings

    synth = tmp_path / "synth"
    pipeline = Pipeline(Settings(out=str(synth), categories=["sts"]), lambda: None)
    words = "river stone cloud garden lamp window market violin harbor engine forest ladder".split()
    records = [{"query": f"question {i} about the {words[i % 12]} and the {words[(i * 7) % 12]}",
                "positive": f"Record {i}: " + " ".join(words[(i + k) % 12] for k in range(30)) + f" number {i}.",
                "negatives": [], "instruction": "Retrieve", "task": "sts", "score": None, "meta": {"id": str(i)}}
               for i in range(20000)]
    pipeline.store.write(0, records, [], {"generated": len(records)})
    pipeline.write_manifest(complete=True, num_shards=1)

    def command(into):
        return [sys.executable, "-m", "synth.merge", "--out", str(synth), "--into", str(into)]

    _check_kills(tmp_path, [synth / "shards", synth / "manifest.json"], command, _fresh(tmp_path, "merged"),
                 {"reading": lambda out: _after(1.0), "writing": lambda out: _staging_beside(out)})

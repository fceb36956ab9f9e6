"""bench/gpu_step.py, the script a lent GPU runs first, kept working on CPU: the tiny shape runs
our step padded and packed and writes its table."""

from __future__ import annotations

import importlib.util

from .train_utils import REPO


def test_the_gpu_step_bench_runs_padded_and_packed_on_a_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "bench" / "gpu_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu_step.md"
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--batch", "4",
                       "--lengths", "8", "64", "--pack-tokens", "256", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| sdpa")]
    assert [r[1].strip() for r in rows] == ["padded", "packed"]
    tokens = [float(r[3]) for r in rows]
    padding = [float(r[4].strip().rstrip("%")) for r in rows]
    assert min(tokens) > 0 and padding[1] < padding[0]

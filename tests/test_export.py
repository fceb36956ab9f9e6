"""Merged export: sentence-transformers reproduces our encode; config and tokenizer carry
everything a server needs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.export import ExportError, export

from .conftest import perturb_trained_weights

QUERIES = ["what is the capital of France?", "how do plants make food", "why is the sky blue at noon?", "x"]
PASSAGES = ["Paris is the capital and largest city of France.", "Photosynthesis makes sugar from light.",
            "Rayleigh scattering favours short wavelengths, so the sky looks blue.", "ok"]
INSTRUCTION = "Given a question, retrieve passages that answer it"


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def trained_model(path, kind, bidirectional, include_instruction=True, lora=True, **kw):
    config = EmbeddingModelConfig(
        backbone=BackboneConfig(str(path), dtype="float32", bidirectional=bidirectional),
        pooling=PoolingConfig(kind, include_instruction=include_instruction, num_latents=8, num_heads=4),
        lora=LoraSettings(r=4) if lora else None,
        **kw,
    )
    config.prompts.default_instruction = INSTRUCTION
    model = EmbeddingModel.build(config)
    perturb_trained_weights(model, seed=7)
    return model


CASES = [(k, b) for k in ("last_token", "mean", "latent_attention") for b in (False, True)]


@pytest.mark.parametrize("kind,bidirectional", CASES)
def test_sentence_transformers_matches_our_encode(tiny_llama_dir, tmp_path, kind, bidirectional):
    from sentence_transformers import SentenceTransformer

    model = trained_model(tiny_llama_dir, kind, bidirectional)
    assert np.array_equal(model.encode(PASSAGES), model.encode(PASSAGES))  # encode is deterministic
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export")

    assert AutoModel.from_pretrained(out).config.is_causal is (not bidirectional)
    if kind == "latent_attention":
        # sentence-transformers 6 imports classes outside its package only when trusted.
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(out), device="cpu")
        st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
        assert type(st[1]).__module__ == "llmembed.st_modules"
    else:
        st = SentenceTransformer(str(out), device="cpu")
    q_ours, q_st = model.encode(QUERIES, instruction=INSTRUCTION), st.encode(QUERIES, prompt_name="query")
    p_ours, p_st = model.encode(PASSAGES), st.encode(PASSAGES)
    assert _cos(q_ours, q_st).min() >= 0.9999, _cos(q_ours, q_st)
    assert _cos(p_ours, p_st).min() >= 0.9999, _cos(p_ours, p_st)
    # The merge really carried the adapter: the un-adapted base gives other vectors.
    with model.backbone.disable_adapter():
        base = model.encode(PASSAGES)
    assert _cos(base, p_st).min() < 0.9999


def test_instruction_excluded_mean_pooling_matches(tiny_llama_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = trained_model(tiny_llama_dir, "mean", True, include_instruction=False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export")
    st = SentenceTransformer(str(out), device="cpu")
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    # Both count the prompt as sentence-transformers does (prefix tokenised alone). A one-token
    # query would leave ST nothing to average (it returns a zero vector) while we keep the last
    # token, so this check uses queries of several words.
    queries = QUERIES[:3]
    cos = _cos(model.encode(queries, instruction=INSTRUCTION), st.encode(queries, prompt_name="query"))
    assert cos.min() >= 0.9999, cos


def test_exported_tokenizer_appends_eos_only_for_last_token(tiny_llama_dir, tmp_path):
    for kind in ("last_token", "mean"):
        model = trained_model(tiny_llama_dir, kind, False, lora=False)
        model.save(tmp_path / kind)
        out = export(tmp_path / kind, tmp_path / f"{kind}-export")
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok("hello world")["input_ids"]
        assert (ids[-1] == tok.eos_token_id) is (kind == "last_token")
        assert ids == model.tokenize(["hello world"])["input_ids"][0].tolist()
        assert not tok.chat_template and not (out / "chat_template.jinja").exists()
        card = (out / "README.md").read_text()
        assert "vllm serve" in card and "prompt_name=\"query\"" in card
        modules = json.loads((out / "modules.json").read_text())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
        prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
        assert prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: "


def test_bf16_export_and_refusal_to_overwrite(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    model = trained_model(tiny_llama_dir, "last_token", False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert not any("lora" in k for k in f.keys())
    with pytest.raises(ExportError, match="not empty"):
        export(tmp_path / "trained", tmp_path / "export")


def test_cli(tiny_llama_dir, tmp_path):
    model = trained_model(tiny_llama_dir, "mean", False)
    model.save(tmp_path / "trained")
    run = subprocess.run([sys.executable, "-m", "llmembed.export", "--model", str(tmp_path / "trained"),
                          "--out", str(tmp_path / "export"), "--instruction", "Find it"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    prompts = json.loads((tmp_path / "export" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Instruct: Find it\nQuery: "
    bad = subprocess.run([sys.executable, "-m", "llmembed.export", "--model", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "llmembed_config.json" in bad.stderr and "Traceback" not in bad.stderr

"""Merged export: sentence-transformers reproduces our encode for every text length up to and
past the serving length; config, tokenizer and ST files are rendered from the one saved
serving contract."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.serve.export import export
from llmembed.outputs import OutputError

from .conftest import perturb_trained_weights

QUERIES = ["what is the capital of France?", "how do plants make food", "why is the sky blue at noon?", "x"]
PASSAGES = ["Paris is the capital and largest city of France.", "Photosynthesis makes sugar from light.",
            "Rayleigh scattering favours short wavelengths, so the sky looks blue.", "ok"]
INSTRUCTION = "Given a question, retrieve passages that answer it"
MAX_LENGTH = 48  # the serving length of the test models: the long texts below run past it
LONG = ("The committee met on Tuesday to review the budget. Several members raised concerns about costs. "
        "They agreed to postpone the new building. The treasurer presented three options. One was to share "
        "equipment with the next town. Another raised the fees for the hall. The decision comes in March. "
        "Until then every department must save.")
# Unequal lengths in one batch: short, about the serving length, and past it.
LONG_QUERIES = QUERIES + [LONG, LONG[:180], "  spaced  out \n", "机器学习是什么？ 🍕"]
LONG_PASSAGES = PASSAGES + [LONG, LONG + " " + LONG, LONG[:200], "数字 123 😀"]


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def trained_model(path, kind, bidirectional, include_instruction=True, lora=True, max_length=MAX_LENGTH, **kw):
    config = EmbeddingModelConfig(
        max_length=max_length,
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
        assert type(st[1]).__module__ == "llmembed.serve.st_modules"
    else:
        st = SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    assert max(len(st.tokenizer(t)["input_ids"]) for t in LONG_PASSAGES) > MAX_LENGTH  # really past it
    # Whole batches of unequal lengths, as both libraries pad them.
    q_ours = model.encode(LONG_QUERIES, instruction=INSTRUCTION, batch_size=8)
    q_st = st.encode(LONG_QUERIES, prompt_name="query", batch_size=8)
    p_ours, p_st = model.encode(LONG_PASSAGES, batch_size=8), st.encode(LONG_PASSAGES, batch_size=8)
    assert _cos(q_ours, q_st).min() >= 0.9999, _cos(q_ours, q_st)
    assert _cos(p_ours, p_st).min() >= 0.9999, _cos(p_ours, p_st)
    # The long texts were cut at the serving length: equal to their own first 47 tokens + EOS.
    assert np.abs(p_ours[4] - p_ours[5]).max() < 1e-5
    # llmembed loads the export itself (merged weights, the same contract) with the same vectors.
    reloaded = EmbeddingModel.load(out)
    assert reloaded.contract == model.contract
    assert _cos(reloaded.encode(LONG_QUERIES, instruction=INSTRUCTION), q_ours).min() >= 0.9999
    # The merge really carried the adapter: the un-adapted base gives other vectors.
    with model.backbone.disable_adapter():
        base = model.encode(PASSAGES)
    assert _cos(base, p_st[: len(PASSAGES)]).min() < 0.9999


def test_instruction_excluded_mean_pooling_matches(tiny_llama_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = trained_model(tiny_llama_dir, "mean", True, include_instruction=False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export")
    st = SentenceTransformer(str(out), device="cpu")
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    # Both count the prompt as sentence-transformers does (prefix tokenised alone).
    queries = QUERIES[:3] + [LONG, LONG[:120]]
    cos = _cos(model.encode(queries, instruction=INSTRUCTION), st.encode(queries, prompt_name="query"))
    assert cos.min() >= 0.9999, cos
    # A one-token query: the prompt count swallows it (BPE merges the prompt's trailing space
    # into it) and ST has nothing to average; we give the same zero vector, not another one.
    ours, theirs = model.encode(["x"], instruction=INSTRUCTION), st.encode(["x"], prompt_name="query")
    assert np.abs(theirs).max() == 0 and np.abs(ours).max() == 0


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
        assert "--dtype float32" in card  # vLLM's "auto" would run this fp32 export in fp16 on CPU
        modules = json.loads((out / "modules.json").read_text())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
        prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
        assert prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: "
        assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_LENGTH
        assert tok.model_max_length == MAX_LENGTH


SERVING_KEYS = {"pooling", "prompts", "normalize", "output_dim", "append_eos", "padding_side", "max_length",
                "is_causal", "bidirectional", "kind", "include_instruction", "default_instruction"}


def _keys(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in _keys(v)}
    return set()


def test_serving_facts_live_in_one_file_and_export_reads_them_there(tiny_llama_dir, tmp_path):
    model = trained_model(tiny_llama_dir, "mean", True)
    model.save(tmp_path / "trained")
    # Every JSON file but the tokenizer's vocabulary (whose tokens include words like "kind").
    files = [p for p in (tmp_path / "trained").rglob("*.json") if p.name != "tokenizer.json"]
    holders = {p.relative_to(tmp_path / "trained").as_posix() for p in files
               if _keys(json.loads(p.read_text())) & (SERVING_KEYS - {"is_causal"})}
    assert holders == {"llmembed_serving.json"}, holders
    assert not (tmp_path / "trained" / "pooling" / "config.json").exists()
    # Change the saved contract by hand: the export follows the file, not the training config.
    path = tmp_path / "trained" / "llmembed_serving.json"
    contract = json.loads(path.read_text())
    contract["max_length"] = 40
    contract["prompts"]["default_instruction"] = "Edited instruction"
    contract["normalize"] = False
    path.write_text(json.dumps(contract))
    out = export(tmp_path / "trained", tmp_path / "export")
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 40
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Instruct: Edited instruction\nQuery: "
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling"]  # no Normalize
    assert json.loads((out / "llmembed_serving.json").read_text()) == contract | {"format_version": 1}
    assert EmbeddingModel.load(tmp_path / "trained").contract.max_length == 40


def test_bf16_export_and_refusal_to_overwrite(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    model = trained_model(tiny_llama_dir, "last_token", False)
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert not any("lora" in k for k in f.keys())
    with pytest.raises(OutputError, match="exists .*pass --overwrite"):
        export(tmp_path / "trained", tmp_path / "export")


def test_cli(tiny_llama_dir, tmp_path):
    model = trained_model(tiny_llama_dir, "mean", False)
    model.save(tmp_path / "trained")
    run = subprocess.run([sys.executable, "-m", "llmembed.serve.export", "--model", str(tmp_path / "trained"),
                          "--out", str(tmp_path / "export"), "--instruction", "Find it"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    prompts = json.loads((tmp_path / "export" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Instruct: Find it\nQuery: "
    bad = subprocess.run([sys.executable, "-m", "llmembed.serve.export", "--model", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "llmembed_config.json" in bad.stderr and "Traceback" not in bad.stderr

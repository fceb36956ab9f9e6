"""`python -m llmembed.serve.verify`: every serving path of an export is checked against our encode,
and a damaged export is caught with the path and the texts that differ."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from llmembed.serve.export import export
from llmembed.serve.verify import probe_set, verify

from .test_export import trained_model


def _run_verify(folder, *extra):
    return subprocess.run([sys.executable, "-m", "llmembed.serve.verify", str(folder), *extra],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, module_tmp):
    tmp = module_tmp("verify")
    model = trained_model(tiny_llama_dir, "last_token", False)
    model.save(tmp / "trained")
    return export(tmp / "trained", tmp / "export", verify=False)


def test_probe_set_covers_the_hard_cases(exported):
    from llmembed.serving import ServingContract

    contract = ServingContract.load(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    probes = probe_set(contract, lambda t: len(tok(t)["input_ids"]))
    names = " ".join(p.name for p in probes)
    for needed in ("one-token", "8-sentence query", "past max_length", "CJK", "emoji", "whitespace", "instruction"):
        assert needed in names
    longest = max(len(tok(p.text)["input_ids"]) for p in probes)
    assert longest > contract.max_length
    assert any(p.is_query for p in probes) and any(not p.is_query for p in probes)


def test_fresh_export_passes(exported, tmp_path):
    run = _run_verify(exported, "--json", str(tmp_path / "report.json"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sentence-transformers" in run.stdout and "transformers" in run.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    paths = {p["path"]: p for p in report["paths"]}
    for name in ("sentence-transformers", "transformers"):
        assert min(paths[name]["cosines"]) >= 0.9999
        assert paths[name]["token_counts"] == report["reference_tokens"]
    assert paths["vllm"]["skipped"]  # no --vllm-python here


def test_export_without_eos_in_its_tokenizer_fails_naming_paths_and_texts(exported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    tok = AutoTokenizer.from_pretrained(broken)
    assert tok("hello")["input_ids"][-1] == tok.eos_token_id
    tok.add_eos_token = False
    tok.save_pretrained(broken)
    assert AutoTokenizer.from_pretrained(broken)("hello")["input_ids"][-1] != tok.eos_token_id

    run = _run_verify(broken)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "MISMATCH" in run.stdout
    for path in ("sentence-transformers", "transformers"):
        assert f"  {path}: 'short passage'" in run.stdout, run.stdout
    assert "tokens, reference" in run.stdout

    report = verify(broken)
    assert not report.ok
    bad = {p.path for p in report.paths if not p.ok}
    assert bad == {"saved files", "sentence-transformers", "transformers"}
    assert report.paths[0].failures == ["tokenizer: appends EOS is False, the contract says True"]


def test_not_an_export_is_one_line(tmp_path):
    run = _run_verify(tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr


def test_a_matryoshka_export_is_checked_at_each_width_through_sentence_transformers_truncate_dim(
        tiny_llama_dir, tmp_path):
    model = trained_model(tiny_llama_dir, "mean", False, matryoshka_dims=[16, 64, 128])
    model.save(tmp_path / "trained")
    out = export(tmp_path / "trained", tmp_path / "export", verify=False)
    report = verify(out)
    print(report.table())
    assert report.ok, report.summary()
    paths = {p.path: p for p in report.paths}
    # Widths below the full 128 get rows of their own; the plain slice by hand (transformers) does not.
    assert [p for p in paths if "@" in p] == ["sentence-transformers @16d", "sentence-transformers @64d"]
    for width in (16, 64):
        cut = paths[f"sentence-transformers @{width}d"]
        # _compare refuses vectors of another shape than the reference's prefix: these are cut.
        assert cut.error is None and min(cut.cosines) >= 0.9999 and cut.token_counts == report.reference_tokens
    assert "vllm @16d" not in paths  # no --vllm-python: the vLLM rows come with the vLLM path


def _edit_json(name, change):
    def edit(folder):
        path = folder / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def _drop_normalize(folder):
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))


# Each serving fact an export saves for its servers, edited in turn: (name, edit, what the
# saved-files row must name, the serving paths whose vectors must then differ).
MUTATIONS = [
    ("query prompt", _edit_json("config_sentence_transformers.json",
                                lambda c: c["prompts"].update(query="Instruct: Find posts\nQuery: ")),
     "prompts.query", {"sentence-transformers"}),
    ("document prompt", _edit_json("config_sentence_transformers.json",
                                   lambda c: c.update(prompts={**c["prompts"], "document": "passage: "},
                                                      default_prompt_name="document")),
     "prompts.document", {"sentence-transformers"}),
    ("Normalize module", _drop_normalize, "a Normalize module", {"sentence-transformers"}),
    ("pooling", _edit_json("1_Pooling/config.json", lambda c: c.update(pooling_mode="mean")), "pooling_mode",
     {"sentence-transformers"}),
    ("instruction pooling", _edit_json("1_Pooling/config.json", lambda c: c.update(include_prompt=False)),
     "include_prompt", set()),
    ("max length", _edit_json("sentence_bert_config.json", lambda c: c.update(max_seq_length=20)), "max_seq_length",
     {"sentence-transformers"}),
    ("width", _edit_json("config.json", lambda c: c.update(matryoshka_dimensions=[32, 64])),
     "matryoshka_dimensions", set()),
    ("attention", _edit_json("config.json", lambda c: c.update(is_causal=False)), "is_causal",
     {"sentence-transformers", "transformers"}),
]


@pytest.mark.parametrize("name,edit,fact,paths", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_saved_serving_fact_edited_fails_verify_and_is_named(exported, tmp_path, name, edit, fact, paths):
    """Servers read the export's files, not the contract: an edit to any of them changes what
    users get, and verify must say which fact it was. (Last-token pooling ignores
    include_prompt, and matryoshka_dimensions is read by vLLM only: those two are caught by the
    files check alone.)"""
    from llmembed.model import EmbeddingModel

    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    edit(edited)
    reference = EmbeddingModel.load(exported, dtype="float32", attn_implementation="sdpa")
    report = verify(edited, reference=reference)
    assert not report.ok
    saved = report.paths[0]
    assert saved.path == "saved files" and any(fact in failure for failure in saved.failures), saved.failures
    bad = {p.path for p in report.paths if not p.ok} - {"saved files"}
    assert bad == paths, report.table()

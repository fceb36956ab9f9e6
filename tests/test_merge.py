"""llmembed.merge: LoRA folders merged linearly or by SLERP into a folder that exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.merge import MergeError, merge, slerp
from llmembed.outputs import OutputError

from .conftest import perturb_trained_weights, save_tiny

TEXTS = ["what is the capital of France?", "Paris is the capital of France.", "Photosynthesis makes sugar."]


def _trained(base, folder, seed, r=4, kind="latent_attention"):
    config = EmbeddingModelConfig(backbone=BackboneConfig(str(base), dtype="float32"),
                                  pooling=PoolingConfig(kind, num_latents=8, num_heads=4),
                                  lora=LoraSettings(r=r, alpha=2 * r, dropout=0.0))
    model = EmbeddingModel.build(config)
    perturb_trained_weights(model, seed=seed)
    with torch.no_grad():  # LoRA A too, so the two runs' deltas point different ways
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save(folder)
    return folder


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, module_tmp):
    root = module_tmp("merge")
    # Different LoRA ranks: adapters are merged into the backbone before the models are mixed.
    return _trained(tiny_llama_dir, root / "a", seed=1, r=4), _trained(tiny_llama_dir, root / "b", seed=2, r=8)


def test_slerp_ends_reproduce_the_inputs_and_the_middle_is_neither(runs, tmp_path):
    a, b = (EmbeddingModel.load(f).encode(TEXTS) for f in runs)
    assert _cos(a, b).min() < 0.99  # the two runs really differ
    at0 = EmbeddingModel.load(merge(runs, tmp_path / "t0", "slerp", [1.0, 0.0])).encode(TEXTS)
    at1 = EmbeddingModel.load(merge(runs, tmp_path / "t1", "slerp", [0.0, 1.0])).encode(TEXTS)
    assert _cos(at0, a).min() >= 0.9999 and _cos(at1, b).min() >= 0.9999
    middle = EmbeddingModel.load(merge(runs, tmp_path / "mid", "slerp")).encode(TEXTS)
    assert _cos(middle, a).min() < 0.9999 and _cos(middle, b).min() < 0.9999


def test_slerp_formula_and_linear_weights():
    torch.manual_seed(0)
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    omega = torch.acos(torch.dot(x.flatten(), y.flatten()) / x.norm() / y.norm())
    t = 0.3
    expected = (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    assert torch.allclose(slerp(x, y, t), expected, atol=1e-5)
    assert torch.allclose(slerp(x, 2 * x, 0.5), 1.5 * x)  # parallel: linear


def test_linear_merge_is_the_weighted_mean_of_lora_merged_weights(runs, tmp_path):
    from llmembed.merge import _without_lora

    one, two = (_without_lora(EmbeddingModel.load(f)).state_dict() for f in runs)
    merged = EmbeddingModel.load(merge(runs, tmp_path / "lin", "linear", [1.0, 3.0])).state_dict()
    key = next(k for k in merged if k.endswith("q_proj.weight"))
    assert torch.allclose(merged[key], 0.25 * one[key] + 0.75 * two[key], atol=1e-6)
    head = next(k for k in merged if k.startswith("pooling."))
    assert torch.allclose(merged[head], 0.25 * one[head] + 0.75 * two[head], atol=1e-6)
    assert not (tmp_path / "lin" / "adapter").exists() and (tmp_path / "lin" / "backbone").is_dir()


def test_scale_walks_the_merged_change_from_the_pretrained_backbone(runs, tiny_llama_dir, tmp_path):
    from llmembed.backbone import load_backbone
    from llmembed.merge import _without_lora

    one, two = (_without_lora(EmbeddingModel.load(f)).state_dict() for f in runs)
    base = load_backbone(BackboneConfig(str(tiny_llama_dir), dtype="float32")).state_dict()
    scaled = EmbeddingModel.load(merge(runs, tmp_path / "s", "linear", [1.0, 3.0], scale=1.5)).state_dict()
    key = next(k for k in scaled if k.endswith("q_proj.weight"))
    start = base[key[len("backbone."):]]
    expected = start + 1.5 * (0.25 * one[key] + 0.75 * two[key] - start)
    assert (one[key] - start).abs().max() > 1e-3  # the runs moved away from the base
    assert torch.allclose(scaled[key], expected, atol=1e-6)
    frozen = next(k for k in scaled if k.endswith("input_layernorm.weight"))  # LoRA left it alone
    assert torch.equal(scaled[frozen], base[frozen[len("backbone."):]])
    head = next(k for k in scaled if k.startswith("pooling."))  # no pretrained value: averaged only
    assert torch.allclose(scaled[head], 0.25 * one[head] + 0.75 * two[head], atol=1e-6)
    # One input: its own change is scaled; scale 2 puts the base halfway between model and merge.
    single = EmbeddingModel.load(merge([runs[0]], tmp_path / "one", scale=2.0)).state_dict()
    assert torch.allclose(single[key], 2 * one[key] - start, atol=1e-6)
    with pytest.raises(MergeError, match="at least two"):
        merge([runs[0]], tmp_path / "lone")
    with pytest.raises(MergeError, match="linear method only"):
        merge(runs, tmp_path / "sl", "slerp", scale=1.5)


def test_scale_refuses_an_export_which_has_no_base(runs, tmp_path):
    from llmembed.serve.export import export

    exported = export(runs[0], tmp_path / "export", verify=False)
    with pytest.raises(MergeError, match="export names itself as its backbone"):
        merge([exported], tmp_path / "x", scale=1.5)
    run = subprocess.run([sys.executable, "-m", "llmembed.merge", str(runs[0]), "--scale", "0", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--scale" in run.stderr and "Traceback" not in run.stderr


def test_a_merged_model_exports_and_passes_verify(runs, tmp_path):
    from llmembed.serve.export import export

    merged = merge(runs, tmp_path / "m", "slerp", [0.5, 0.5])
    out = export(merged, tmp_path / "export")  # raises if verify finds a mismatch
    from sentence_transformers import SentenceTransformer

    ours = EmbeddingModel.load(merged).encode(TEXTS)
    # The latent-attention head is our module: sentence-transformers runs it only when asked.
    served = SentenceTransformer(str(out), device="cpu", trust_remote_code=True).encode(TEXTS)
    assert _cos(served, ours).min() >= 0.9999


def test_unmergeable_inputs_are_one_line_errors(runs, tiny_llama_dir, tmp_path, default_dir):
    other_base = save_tiny(tmp_path / "wide", "llama", default_dir, vocab_size=49152, hidden_size=64, heads=2,
                           kv_heads=1)
    wide = _trained(other_base, tmp_path / "wide-run", seed=3)
    with pytest.raises(MergeError, match="wide-run: tensor .* has shape"):
        merge([runs[0], wide], tmp_path / "x")
    mean = _trained(tiny_llama_dir, tmp_path / "mean-run", seed=4, kind="mean")
    with pytest.raises(MergeError, match="mean-run: serves differently .*pooling"):
        merge([runs[0], mean], tmp_path / "y")
    with pytest.raises(MergeError, match="exactly two"):
        merge([runs[0], runs[1], runs[0]], tmp_path / "z", "slerp")
    run = subprocess.run([sys.executable, "-m", "llmembed.merge", str(runs[0]), str(tmp_path / "gone"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "gone: cannot load" in run.stderr and "Traceback" not in run.stderr


def test_overwrite_replaces_only_a_previous_model_folder(runs, tmp_path):
    out = tmp_path / "m"
    merge(runs, out, "linear", [1.0, 0.0])
    first = EmbeddingModel.load(out).encode(TEXTS)
    with pytest.raises(OutputError, match="exists .*pass --overwrite"):
        merge(runs, out, "linear", [0.0, 1.0])
    merge(runs, out, "linear", [0.0, 1.0], overwrite=True)
    second = EmbeddingModel.load(out).encode(TEXTS)
    expected = EmbeddingModel.load(runs[1]).encode(TEXTS)
    assert _cos(second, expected).min() >= 0.9999 and _cos(second, first).min() < 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left beside it
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a model folder"):
        merge(runs, notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "keep me"


def test_evaluate_shows_the_untrained_configuration_of_a_merged_folder_but_not_of_an_export(runs, tmp_path):
    """``--baseline`` puts the untrained base next to every trained folder, merged ones included
    (the main job evaluates a merge of two seeds); an export has no base to show."""
    import json

    from llmembed.evaluate.__main__ import main
    from llmembed.serve.export import export

    merged = merge(runs, tmp_path / "merged")
    exported = export(merged, tmp_path / "export")
    pairs = [("what is the capital of France?", "Paris is the capital of France."),
             ("how do plants make sugar?", "Photosynthesis makes sugar from light."),
             ("who wrote Hamlet?", "Shakespeare wrote Hamlet around 1600."),
             ("what is water made of?", "Water is two hydrogen atoms and one oxygen atom.")]
    records = tmp_path / "heldout.jsonl"
    records.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in pairs))
    assert main(["--model", str(runs[0]), "--model", str(merged), "--model", str(exported), "--suite", "none",
                 "--data", str(records), "--baseline", "--json", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    untrained = [name for name in scores if name.endswith("(untrained)")]
    assert len(untrained) == 2 and not any(name.startswith("export") for name in untrained)
    assert len(scores) == 5
    # Both untrained rows are the same base model: the same scores to the last digit.
    first, second = (scores[name] for name in untrained)
    assert first == second

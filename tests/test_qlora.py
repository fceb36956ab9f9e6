"""QLoRA on CPU: LoRA gradients over a 4-bit NF4 base equal those of an fp32 twin holding the
dequantised weights, also after an evaluation pass (the bitsandbytes avx512-bf16 repack trap)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, LoraSettings, PoolingConfig
from llmembed.losses import InfoNCELoss

from .conftest import save_tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

QUERIES = ["what is the capital of France?", "how do plants make food", "why is the sky blue?"]
PASSAGES = ["Paris is the capital of France.", "Photosynthesis makes sugar.", "Rayleigh scattering.",
            "Bananas are yellow.", "The train was late.", "Cats sleep a lot."]


def _dequantised_twin(quant: EmbeddingModel, path) -> EmbeddingModel:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    twin = EmbeddingModel.build(EmbeddingModelConfig(
        backbone=BackboneConfig(str(path), dtype="float32"), pooling=quant.config.pooling,
        lora=quant.config.lora))
    modules = dict(twin.backbone.named_modules())
    for name, module in quant.backbone.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            modules[name].weight.data.copy_(weight)
    # LoRA, norms, embeddings, head: everything but the (already copied) quantised weights.
    quantised = {f"backbone.{n}.weight" for n, m in quant.backbone.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    state = {k: v for k, v in quant.state_dict().items() if k not in quantised and "quant" not in k
             and not k.endswith((".absmax", ".nested_absmax", ".nested_quant_map", ".quant_map"))}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert {k for k in missing} == quantised
    return twin


def _lora_grads(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    model.zero_grad()
    q = model(**model.tokenize(QUERIES, instruction="Retrieve"))
    p = model(**model.tokenize(PASSAGES))
    InfoNCELoss(temperature=0.05)(q, p, group_size=2).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("eval_first", (False, True))
def test_qlora_gradients_match_dequantised_fp32_twin(tmp_path, default_dir, eval_first):
    path = save_tiny(tmp_path / "tiny", "llama", default_dir, vocab_size=49152, hidden_size=128, heads=2, kv_heads=1)
    quant = EmbeddingModel.build(EmbeddingModelConfig(
        backbone=BackboneConfig(str(path), dtype="float32", quantization="4bit"), pooling=PoolingConfig("mean"),
        lora=LoraSettings(r=4, dropout=0.0)), gradient_checkpointing=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in quant.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    twin = _dequantised_twin(quant, path)
    quant.train()
    twin.train()
    if eval_first:
        quant.encode(PASSAGES)  # a no-grad pass: where the avx512-bf16 repack used to happen
    got, want = _lora_grads(quant), _lora_grads(twin)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert err <= 1e-3, f"{name}: relative error {err:.2e}"

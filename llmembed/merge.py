"""``python -m llmembed.merge A B [C ...] --method linear|slerp [--weights ...] --out M``

Merge trained model folders of the same base into one model folder.

Checkpoint merging is how several recent embedders were finished: Qwen3-Embedding merges
checkpoints from its last stage (arXiv 2506.05176), and LM-Cocktail (Xiao et al., 2023,
arXiv 2311.13534) mixes a fine-tuned model back with its base to keep general ability. Each
input's LoRA is merged into its backbone first, so adapters of different ranks mix; the
pooling heads (latent attention) are merged too. The inputs must share the base architecture
(every tensor's name and shape) and the serving contract (pooling, prompts, EOS, lengths),
since a merged model serves one way.

- ``linear``: sum of ``weights[i] * theta_i``, weights normalised to sum to 1 (default equal).
- ``slerp``: two inputs; each tensor is interpolated along the great circle between the two
  (Shoemake, 1985), at ``t = weights[1] / (weights[0] + weights[1])`` (default 0.5); nearly
  parallel tensors fall back to linear interpolation.
- ``--scale L`` (linear only) scales the merged change from the shared pretrained backbone:
  ``base + L * sum(weights[i] * (theta_i - base))``, task arithmetic's scaling coefficient
  (Ilharco et al., 2023, arXiv 2212.04089). Averaging fine-tunes that moved in partly different
  directions shortens the average move, and LoRA runs on a small budget stop short; ``L > 1``
  walks further along it. With a scale, one input is enough (its own change is scaled).
  Tensors the base has not (a latent-attention head) are averaged without scaling.

The output is a model folder like the trainer's (full backbone, no adapter), which
``llmembed.serve.export``, ``llmembed.evaluate`` and ``llmembed.serve.verify`` (after export) take.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from llmembed.argtypes import float_in
from llmembed.backbone import load_backbone
from llmembed.lora import is_peft_model
from llmembed.model import CONFIG_FILE, EmbeddingModel, model_inputs
from llmembed.outputs import Kind, OutputError, check_output, folder_with, staged_folder

METHODS = ("linear", "slerp")
_PARALLEL = 0.9995  # |cos| above this: slerp's sin(omega) is too small to divide by


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the folder and what differs."""


MERGE_KIND = Kind("a model folder", folder=True, recognise=folder_with(CONFIG_FILE))


def _without_lora(model: EmbeddingModel) -> EmbeddingModel:
    if not is_peft_model(model.backbone):
        return model
    backbone = model.backbone.merge_and_unload()
    return EmbeddingModel(replace(model.config, lora=None), backbone, model.tokenizer, model.pooling, model.contract)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors, in float32."""
    va, vb = a.flatten().float(), b.flatten().float()
    na, nb = va.norm(), vb.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * va + t * vb).view_as(a)
    cos = float(torch.dot(va / na, vb / nb).clamp(-1.0, 1.0))
    if abs(cos) > _PARALLEL:
        return ((1 - t) * va + t * vb).view_as(a)
    omega = math.acos(cos)
    sin = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin * va + math.sin(t * omega) / sin * vb).view_as(a)


def merge_states(states: Sequence[dict[str, torch.Tensor]], method: str, weights: Sequence[float],
                 names: Sequence[str], base: dict[str, torch.Tensor] | None = None,
                 scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The merged state dict; non-float tensors (buffers such as position ids) come from the first.

    With ``base`` (the pretrained state under the same names), each float tensor it holds becomes
    ``base + scale * (linear merge - base)``.
    """
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            missing = sorted(first.keys() ^ state.keys())[0]
            raise MergeError(f"{name}: not the same architecture as {names[0]} (tensor {missing} is in one only)")
        for key, tensor in first.items():
            if state[key].shape != tensor.shape:
                raise MergeError(f"{name}: tensor {key} has shape {tuple(state[key].shape)}, "
                                 f"{names[0]} has {tuple(tensor.shape)}: not the same base")
    merged = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            merged[key] = tensor.clone()
        elif method == "slerp":
            merged[key] = slerp(tensor, states[1][key], weights[1]).to(tensor.dtype)
        else:
            average = sum(w * s[key].float() for w, s in zip(weights, states))
            if base is not None and key in base and base[key].shape == tensor.shape:
                start = base[key].float()
                average = start + scale * (average - start)
            merged[key] = average.to(tensor.dtype)
    return merged


def merge(folders: Sequence[str | Path], out: str | Path, method: str = "linear",
          weights: Sequence[float] | None = None, trust_remote_code: bool = False,
          overwrite: bool = False, scale: float = 1.0) -> Path:
    """Merge ``folders`` into the model folder ``out`` (see the module docstring).

    ``out`` must be absent or empty; ``overwrite`` also replaces a previous model folder (never
    another kind of folder). The merge is written beside ``out`` and renamed into place when
    complete, so a killed merge leaves no half-written model behind.
    """
    out = check_output(out, inputs=[p for folder in folders for p in model_inputs(folder)], kind=MERGE_KIND,
                       overwrite=overwrite)
    if method not in METHODS:
        raise MergeError(f"method must be one of {METHODS}, got {method!r}")
    if scale <= 0:
        raise MergeError(f"scale must be > 0, got {scale}")
    if scale != 1.0 and method != "linear":
        raise MergeError(f"--scale applies to the linear method only, not {method}")
    if len(folders) < (1 if scale != 1.0 else 2):
        raise MergeError("give at least two model folders to merge (or one with --scale)")
    if method == "slerp" and len(folders) != 2:
        raise MergeError(f"slerp merges exactly two models, got {len(folders)}")
    weights = [1.0] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders):
        raise MergeError(f"{len(weights)} weights for {len(folders)} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights must be >= 0 with a positive sum, got {weights}")
    weights = [w / sum(weights) for w in weights]
    names = [str(f) for f in folders]
    models = []
    for folder in folders:
        try:
            models.append(_without_lora(EmbeddingModel.load(folder, trust_remote_code=trust_remote_code)))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise MergeError(f"{folder}: cannot load ({str(err).splitlines()[0]})") from None
    for model, name in zip(models[1:], names[1:]):
        if model.contract != models[0].contract:
            fields = [f for f in vars(model.contract) if getattr(model.contract, f) != getattr(models[0].contract, f)]
            raise MergeError(f"{name}: serves differently from {names[0]} ({', '.join(fields)}); "
                             "merged models need one serving contract")
    base = _base_state(models, names) if scale != 1.0 else None
    merged = merge_states([m.state_dict() for m in models], method, weights, names, base, scale)
    target = models[0]
    target.load_state_dict(merged)
    with staged_folder(out) as staging:
        target.save(staging)
    return out


def _base_state(models: Sequence[EmbeddingModel], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The pretrained backbone every input started from, under the merged model's tensor names."""
    source = models[0].config.backbone
    for model, name in zip(models, names):
        backbone = model.config.backbone
        if Path(backbone.name_or_path).resolve() == Path(name).resolve():
            raise MergeError(f"{name}: an export names itself as its backbone, so --scale has no base to measure "
                             "from; merge the trained model folders instead")
        if backbone.name_or_path != source.name_or_path:
            raise MergeError(f"{name}: trained from {backbone.name_or_path!r}, {names[0]} from "
                             f"{source.name_or_path!r}; --scale needs one base")
    pretrained = load_backbone(replace(source, quantization=None))
    return {f"backbone.{key}": tensor for key, tensor in pretrained.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.merge", description=__doc__.split("\n\n")[1])
    parser.add_argument("models", nargs="+", help="trained model folders of the same base (LoRA or full)")
    parser.add_argument("--method", choices=METHODS, default="linear")
    parser.add_argument("--weights", nargs="+", type=float_in(0.0, float("inf")),
                        help="one per model, normalised to sum to 1 (default: equal); slerp's t is the second's share")
    parser.add_argument("--scale", type=float_in(0.0, low_open=True), default=1.0,
                        help="linear only: scale the merged change from the pretrained backbone (task arithmetic; "
                             "default 1, the plain average)")
    parser.add_argument("--out", required=True, help="the merged model folder (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it is a model folder")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        merge(args.models, out, args.method, args.weights, args.trust_remote_code, args.overwrite, args.scale)
    except (MergeError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scaled = f", change x{args.scale:g}" if args.scale != 1.0 else ""
    print(f"merged {len(args.models)} models ({args.method}{scaled}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model-path resolver shared by the trainer and synth: stdlib-only at import, clear
one-line errors, and synth never pulls in the model code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmembed.backbone import BackboneError, resolve_backbone_path
from llmembed.resolve import ModelPathError, resolve_model_path
from synth.backends import BackendError
from synth.backends.base import model_path


def test_resolver_checks_folders_and_passes_hub_ids(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    # A folder copied in part is named with what it lacks (transformers would try the hub).
    with pytest.raises(ModelPathError, match=r"model: incomplete model folder \(half copied\?\), missing \*\.safetensors"):
        resolve_model_path(str(tmp_path / "model"))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(str(tmp_path / "model")) == str(tmp_path / "model")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelPathError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    # The trainer and synth report the same problem in their own terms, in one line.
    with pytest.raises(BackboneError, match=r"^backbone.name_or_path: .* has no config.json"):
        resolve_backbone_path(str(tmp_path / "empty"))
    with pytest.raises(BackendError, match=r"^model '.*empty': .* has no config.json") as err:
        model_path(str(tmp_path / "empty"))
    assert "\n" not in str(err.value)


def test_default_alias_resolves_to_the_converted_folder(default_dir):
    assert resolve_model_path("default") == resolve_model_path("smollm2") == str(default_dir)
    assert resolve_backbone_path("default") == model_path("default") == str(default_dir)


def test_resolver_and_synth_import_no_model_code():
    code = (
        "import sys\n"
        "import llmembed.resolve\n"
        "heavy = {'torch', 'transformers', 'filelock'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import synth.generate, synth.pipeline, synth.backends.openai_backend, synth.backends.vllm_backend\n"
        "import synth.backends.transformers_backend\n"
        "model = {'llmembed.model', 'llmembed.backbone', 'llmembed.assets'} & set(sys.modules)\n"
        "assert not model, model\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

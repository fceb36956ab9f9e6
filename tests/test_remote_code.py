"""No code from a model folder, anywhere in it: crafted exports that hide a request for remote
code (in a module's subfolder, in a module class of their own, behind a module path leading out
of the folder, in a tokenizer config) never run it through verify, evaluate, mine, merge or
EmbeddingModel.load; each command refuses in one line naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from llmembed.serve.export import export
from llmembed.model import EmbeddingModel
from llmembed.remote_code import RemoteCodeError, remote_code_requests

from .test_export import trained_model
from .train_utils import write_pairs

pytestmark = pytest.mark.integration

PAYLOAD = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def clean_export(tiny_llama_dir, module_tmp):
    tmp = module_tmp("remote-code")
    trained_model(tiny_llama_dir, "last_token", False).save(tmp / "trained")
    return export(tmp / "trained", tmp / "export", verify=False)


def _modules(folder):
    return json.loads((folder / "modules.json").read_text())


def _with_auto_map(config: dict, module: str) -> dict:
    return {**config, "auto_map": {"AutoConfig": f"{module}.EvilConfig", "AutoModel": f"{module}.EvilModel",
                                   "AutoTokenizer": [f"{module}.EvilTokenizer", None]}}


def craft(clean, root, variant: str):
    """A copy of ``clean`` that asks for code in the way ``variant`` names; the code, if it ever
    runs, writes ``root/marker``."""
    folder = root / f"crafted-{variant}"
    shutil.copytree(clean, folder)
    marker = root / "marker"
    code = PAYLOAD.format(marker=str(marker))
    modules = _modules(folder)
    if variant in ("module-subfolder", "tokenizer-subfolder"):
        sub = folder / "evil"
        shutil.copytree(clean, sub, ignore=shutil.ignore_patterns("modules.json", "*_Pooling", "*_Normalize"))
        (sub / "evil_code.py").write_text(code)
        name = "config.json" if variant == "module-subfolder" else "tokenizer_config.json"
        (sub / name).write_text(json.dumps(_with_auto_map(json.loads((sub / name).read_text()), "evil_code")))
        modules[0]["path"] = "evil"
        # An llmembed module is what made verify switch remote code on by itself.
        modules[1]["type"] = "llmembed.serve.st_modules.LatentAttentionPooling"
    elif variant == "own-module-class":
        (folder / "evil_code.py").write_text(code + "class Evil:\n    pass\n")
        modules[1]["type"] = "evil_code.Evil"
    elif variant == "path-out-of-folder":
        outside = root / f"outside-{variant}"
        shutil.copytree(clean, outside, ignore=shutil.ignore_patterns("modules.json", "*_Pooling", "*_Normalize"))
        (outside / "evil_code.py").write_text(code)
        (outside / "config.json").write_text(json.dumps(_with_auto_map(json.loads((outside / "config.json").read_text()),
                                                                       "evil_code")))
        modules[0]["path"] = f"../{outside.name}"
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder, marker


VARIANTS = ["module-subfolder", "tokenizer-subfolder", "own-module-class", "path-out-of-folder"]


def test_every_variant_is_found_and_a_clean_export_has_none(clean_export, tmp_path):
    assert remote_code_requests(clean_export) == []
    for variant in VARIANTS:
        folder, _ = craft(clean_export, tmp_path, variant)
        assert remote_code_requests(folder), variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_loading_command_runs_the_code(clean_export, tmp_path, variant, capsys):
    from llmembed.evaluate.__main__ import main as evaluate_main
    from llmembed.merge import MergeError, merge
    from llmembed.mine import main as mine_main
    from llmembed.serve.verify import main as verify_main

    folder, marker = craft(clean_export, tmp_path, variant)
    write_pairs(tmp_path / "pairs.jsonl", 8)
    with pytest.raises(RemoteCodeError, match="not loading"):
        EmbeddingModel.load(folder)
    runs = {
        "verify": lambda: verify_main([str(folder)]),
        "evaluate": lambda: evaluate_main(["--model", str(folder), "--data", str(tmp_path / "pairs.jsonl")]),
        "evaluate-st": lambda: evaluate_main(["--model", str(folder), "--backend", "sentence-transformers",
                                              "--data", str(tmp_path / "pairs.jsonl")]),
        "mine": lambda: mine_main(["--model", str(folder), "--input", str(tmp_path / "pairs.jsonl"), "--out",
                                   str(tmp_path / "mined.jsonl"), "--ranks", "0:2", "--no-progress"]),
    }
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == 2, name
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "trust-remote-code" in errors[0], (name, errors)
    with pytest.raises(MergeError, match="trust-remote-code"):
        merge([folder], tmp_path / "merged", scale=1.5)
    assert not marker.exists()
    assert not (tmp_path / "mined.jsonl").exists() and not (tmp_path / "merged").exists()

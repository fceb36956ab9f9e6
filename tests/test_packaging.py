"""llmembed installed the ordinary way (``pip install .``, not editable) trains on its own: the
DeepSpeed presets and every module come from the installed package, never from a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import tomllib

from .train_utils import REPO

# Runs ``python -m llmembed.train`` after printing where llmembed was imported from, in the
# same process (so the check is about the very modules that train).
TRAIN_AS_INSTALLED = ("import runpy, llmembed; print('llmembed imported from', llmembed.__file__, flush=True); "
                      "runpy.run_module('llmembed.train', run_name='__main__', alter_sys=True)")


def _packages_on_disk() -> set[str]:
    found = set()
    for top in ("llmembed", "synth"):
        for init in (REPO / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(init.parent.relative_to(REPO).parts))
    return found


def test_every_package_and_preset_is_in_the_distribution():
    """pyproject lists packages explicitly (ds_configs is mapped in from outside llmembed/), so
    a new package missing from the list would silently be left out of wheels."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    assert _packages_on_disk() | {"llmembed.ds_configs"} == listed
    assert setuptools["package-dir"] == {"llmembed.ds_configs": "ds_configs"}
    from llmembed.train.deepspeed_config import PRESETS, read_preset_text

    for name, file in PRESETS.items():
        assert (REPO / "ds_configs" / file).is_file()
        assert json.loads(read_preset_text(name)[0]) == json.loads((REPO / "ds_configs" / file).read_text())


@pytest.mark.integration
def test_non_editable_install_trains_quickstart_with_zero2(tmp_path, tiny_llama_dir):
    # Build from a copy, so the build writes nothing into the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(src)], check=True, timeout=600)
    assert (site / "llmembed" / "ds_configs" / "zero2.json").is_file()
    assert (site / "synth" / "taxonomy.yaml").is_file() and list((site / "synth" / "templates").glob("*.txt"))
    shutil.rmtree(src)  # nothing may point back at the source either

    work = tmp_path / "work"  # a working directory outside the repository
    work.mkdir()
    shutil.copy(REPO / "launch" / "configs" / "quickstart.yaml", work / "quickstart.yaml")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # The packaged real pairs, written where the quickstart config looks (relative to the cwd).
    subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", "runs/quickstart/data"],
                   cwd=work, env=env, check=True, timeout=300)
    cmd = [sys.executable, "-c", TRAIN_AS_INSTALLED, "--config", "quickstart.yaml",
           "--set", f"model.backbone.name_or_path={tiny_llama_dir}", "--set", "train.max_steps=2",
           "--set", "train.deepspeed=zero2", "--set", "checkpoint.save_every=1", "--set", "logging.progress_bar=false"]
    run = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         check=False, timeout=600)
    assert run.returncode == 0, run.stdout[-8000:]
    assert f"llmembed imported from {site / 'llmembed' / '__init__.py'}" in run.stdout
    out = work / "runs" / "quickstart" / "run"
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step-1"
    assert (out / "final" / "llmembed_serving.json").is_file()

"""Nothing lost, nothing silently wrong: destructive export paths are
refused before anything is touched, misspelt record keys and non-finite settings are named,
and a one-record dataset cannot hang the collator."""

from __future__ import annotations

import json

import pytest

from llmembed.losses import InfoNCE
from llmembed.config import ConfigError
from llmembed.data import DataError, read_jsonl
from llmembed.data.collate import ContrastiveCollator, LoadedDataset
from llmembed.data.schema import Record
from llmembed.serve.export import export
from llmembed.outputs import OutputError
from llmembed.model import EmbeddingModel
from llmembed.train.config import load_config

from .test_export import trained_model


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, module_tmp):
    folder = module_tmp("safety") / "trained"
    trained_model(tiny_llama_dir, "last_token", False).save(folder)
    return folder


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["itself", "parent", "inside"])
def test_export_never_writes_over_or_around_its_own_model(trained, where):
    before = _files(trained)
    out = {"itself": trained, "parent": trained.parent, "inside": trained / "export"}[where]
    with pytest.raises(OutputError, match="(is|contains|lies inside) the input"):
        export(trained, out, overwrite=True, verify=False)
    assert _files(trained) == before
    EmbeddingModel.load(trained)  # still loads


def test_overwrite_replaces_only_a_previous_export(trained, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an llmembed export"):
        export(trained, precious, overwrite=True, verify=False)
    assert (precious / "notes.txt").read_text() == "mine"
    # A typo in the model folder is found before an existing export is touched.
    out = export(trained, tmp_path / "export", verify=False)
    before = _files(out)
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "trainde", out, overwrite=True, verify=False)
    assert _files(out) == before
    # A real overwrite swaps the new export in whole and leaves no staging folders behind.
    export(trained, out, overwrite=True, verify=False, instruction="Another task")
    assert _files(out) == before
    assert "Another task" in json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "precious"]


def test_misspelt_record_keys_are_named_with_the_likely_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p", "negative": ["n"]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'negative': unknown key .* did you mean 'negatives'"):
        read_jsonl(path)
    path.write_text(json.dumps({"query": "q", "positive": "p", "negatvies": ["n"]}) + "\n")
    with pytest.raises(DataError, match="did you mean 'negatives'"):
        read_jsonl(path)
    assert read_jsonl(path, ignore_unknown_keys=True)[0].negatives == []
    # The anchor layout keeps its own singular key.
    path.write_text(json.dumps({"anchor": "q", "positive": "p", "negative": "n", "id": 3}) + "\n")
    assert read_jsonl(path)[0].negatives == ["n"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused_for_every_float_setting(value):
    with pytest.raises(ConfigError, match="loss.temperature: expected a finite number"):
        load_config(None, [f"loss.temperature={value}"])
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(None, [f"train.lr={value}"])


def _numeric_settings(cls=None, prefix=""):
    """(dotted key, field) for every int/float setting a training config has, nested ones too."""
    import dataclasses
    import typing

    from llmembed.config import _unwrap_optional
    from llmembed.train.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_settings(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", f


def test_every_numeric_setting_declares_and_enforces_its_range():
    """The class of fault, not one case: each int/float setting (present and future) has a
    declared range, and a value just outside it is refused naming the full key."""
    settings = list(_numeric_settings())
    assert len(settings) >= 25
    undeclared = [key for key, f in settings if "range" not in f.metadata]
    assert not undeclared, f"settings without a declared range: {undeclared}"
    for key, f in settings:
        bounds = f.metadata["range"]
        is_int = "int" in str(f.type)
        is_list = "list[" in str(f.type)  # a list setting: each item is checked
        outside = []
        if bounds.ge is not None:
            outside.append(bounds.ge - 1 if is_int else bounds.ge - 0.5)
        if bounds.gt is not None:
            outside.append(bounds.gt)
        if bounds.le is not None:
            outside.append(bounds.le + 1)
        if bounds.lt is not None:
            outside.append(bounds.lt)
        assert outside, key
        for value in outside:
            if key.startswith("data.datasets."):
                override = f"data.datasets=[{{path: x.jsonl, {key.rsplit('.', 1)[1]}: {value}}}]"
                expected = rf"data\.datasets\[0\]\.{key.rsplit('.', 1)[1]}: must be"
            else:
                if key.startswith("model.lora."):
                    override = f"model.lora={{{key.rsplit('.', 1)[1]}: {value}}}"
                else:
                    override = f"{key}=[{value}]" if is_list else f"{key}={value}"
                expected = rf"{key.replace('.', '[.]')}: must be"
            with pytest.raises(ConfigError, match=expected):
                load_config(None, [override])
    # The boundary itself is accepted where the range is closed.
    config = load_config(None, ["train.warmup_ratio=1.0", "checkpoint.keep_last=0", "train.seed=0"])
    assert (config.train.warmup_ratio, config.checkpoint.keep_last, config.train.seed) == (1.0, 0, 0)


def test_ranges_hold_for_configs_built_in_python_too():
    from llmembed.lora import LoraSettings
    from llmembed.train.config import OptimConfig

    with pytest.raises(ValueError, match="dropout must be < 1.0"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValueError, match="per_device_batch_size must be >= 1, got 0"):
        OptimConfig(per_device_batch_size=0)


def test_one_record_dataset_is_a_clear_error_or_works(default_dir):
    from llmembed.backbone import load_tokenizer
    from llmembed.data.sampling import BatchRef
    from llmembed.serving import ServingContract
    from llmembed.tokenization import EmbeddingTokenizer

    text_tokenizer = EmbeddingTokenizer(load_tokenizer(str(default_dir)), ServingContract())
    lone = [Record("q", ["p"])]
    with pytest.raises(ValueError, match="needs hard negatives or at least 2 records"):
        ContrastiveCollator(text_tokenizer, [LoadedDataset("lone", lone, None, True, 2, InfoNCE)])
    # With its own negative, or without negatives in the group, one record works.
    with_negative = [Record("q", ["p"], ["n"])]
    batch = ContrastiveCollator(text_tokenizer, [LoadedDataset("one", with_negative, None, True, 2, InfoNCE)])(
        BatchRef(0, (0,), epoch=0, step=0))
    assert batch["passage"]["input_ids"].shape[0] == 2
    batch = ContrastiveCollator(text_tokenizer, [LoadedDataset("one", lone, None, True, 1, InfoNCE)])(
        BatchRef(0, (0,), epoch=0, step=0))
    assert batch["passage"]["input_ids"].shape[0] == 1


def test_a_folder_cannot_switch_on_remote_code_for_itself(trained, tmp_path):
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "asks"
    shutil.copytree(trained, folder)
    marker = tmp_path / "code-ran"
    (folder / "tokenizer" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map.*trust_remote_code=True"):
        EmbeddingModel.load(folder)
    run = subprocess.run([sys.executable, "-m", "llmembed.serve.export", "--model", str(folder), "--out",
                          str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--trust-remote-code" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists() and not (tmp_path / "export").exists()
    # The saved training setting alone does not switch it on either.
    shutil.copy(trained / "tokenizer" / "tokenizer_config.json", config_file)
    saved = json.loads((folder / "llmembed_config.json").read_text())
    saved["backbone"]["trust_remote_code"] = True
    (folder / "llmembed_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="trained with trust_remote_code"):
        EmbeddingModel.load(folder)
    assert EmbeddingModel.load(folder, trust_remote_code=True).config.backbone.trust_remote_code is True


def test_rng_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from llmembed.train.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    numbers, tensors = rng_state()
    (tmp_path / "n.json").write_text(json.dumps(numbers))  # JSON and safetensors: nothing to unpickle
    save_file(tensors, str(tmp_path / "t.safetensors"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(json.loads((tmp_path / "n.json").read_text()), load_file(str(tmp_path / "t.safetensors")))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_resume_drops_a_torn_metrics_line_and_later_steps(tmp_path):
    """A kill mid-write leaves a partial last line in metrics.jsonl: the resumed run keeps every
    whole line up to its checkpoint and nothing else, and logs on from there."""
    from llmembed.train.config import LoggingConfig
    from llmembed.train.logging import RunLogger

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    run = RunLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), rank=0, total_steps=10,
                    start_step=4, run_config={})
    run.log(5, {"loss": 0.5, "accuracy": 1.0, "lr": 1e-4})
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # Torn in the middle of the number, or not a step at all: dropped the same way.
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": "x"}\n[1]\n{"step": 1')
    RunLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), 0, 10, 3, {})
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_stages_lay_their_sections_over_the_shared_ones_and_chain_their_models(tmp_path):
    import yaml

    from llmembed.config import ConfigError
    from llmembed.train.config import load_plan

    base = {"data": {"datasets": [{"path": "weak.jsonl"}], "group_size": 1},
            "train": {"lr": 1e-4, "epochs": 1}, "checkpoint": {"output_dir": str(tmp_path / "run")},
            "stages": [{"name": "weak"},
                       {"name": "hard", "data": {"datasets": [{"path": "triples.jsonl"}], "group_size": 4},
                        "train": {"lr": 2e-5}}]}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(base))
    weak, hard = load_plan(path, ["train.epochs=2"])
    assert (weak.name, hard.name) == ("weak", "hard")
    assert weak.config.checkpoint.output_dir == str(tmp_path / "run" / "weak") and weak.config.train.init_from is None
    assert hard.config.checkpoint.output_dir == str(tmp_path / "run" / "hard")
    assert hard.config.train.init_from == str(tmp_path / "run" / "weak" / "final")
    assert [d.path for d in weak.config.data.datasets] == ["weak.jsonl"] and weak.config.data.group_size == 1
    assert [d.path for d in hard.config.data.datasets] == ["triples.jsonl"] and hard.config.data.group_size == 4
    assert (weak.config.train.lr, hard.config.train.lr) == (1e-4, 2e-5)
    assert weak.config.train.epochs == hard.config.train.epochs == 2  # --set reaches every stage
    assert [s.name for s in load_plan(None, ["train.lr=1e-3"])] == [""]
    with pytest.raises(ConfigError, match="has stages; read it with load_plan"):
        load_config(path)
    for stages, message in (([{"name": "a"}, {"name": "a"}], "used twice"),
                            ([{"train": {}}], r"stages\[0\]: each stage is a mapping with a name"),
                            ([{"name": "a"}, {"name": "b", "train": {"lr": -1}}], r"stages\[1\] \(b\): train\.lr")):
        path.write_text(yaml.safe_dump({**base, "stages": stages}))
        with pytest.raises(ConfigError, match=message):
            load_plan(path)

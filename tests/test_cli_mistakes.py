"""Ordinary mistakes through every command line: each is one line naming the input
and exit status 2, never a traceback, and no file that existed before is changed or lost.

Every case runs the real entry point in a fresh process, as a user would. The workspace
holds what a user has on disk (a trained model, an export, data, a config, a synth output);
after each case every one of those files is compared with its content from before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmembed.serve.encoders import reference_model_dir
from llmembed.serve.export import export

from .test_export import trained_model
from .train_utils import REPO, write_pairs

pytestmark = pytest.mark.integration

TRAIN = [str(REPO / "launch" / "train.py")]
EXPORT = ["-m", "llmembed.serve.export"]
EVALUATE = ["-m", "llmembed.evaluate"]
VERIFY = ["-m", "llmembed.serve.verify"]
SYNTH = ["-m", "synth.generate"]
PACKAGED = ["-m", "llmembed.data.packaged"]
MINE = ["-m", "llmembed.mine"]
MERGE = ["-m", "llmembed.merge"]
SYNTH_MERGE = ["-m", "synth.merge"]


@pytest.fixture(scope="module")
def workspace(tiny_llama_dir, module_tmp) -> Path:
    ws = module_tmp("mistakes")
    trained_model(tiny_llama_dir, "last_token", False).save(ws / "model")
    export(ws / "model", ws / "export", verify=False)
    write_pairs(ws / "pairs.jsonl", 16)
    (ws / "config.yaml").write_text(yaml.safe_dump({
        "model": {"backbone": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"}, "lora": {"r": 4}},
        "data": {"datasets": [{"path": str(ws / "pairs.jsonl")}], "query_max_length": 32,
                 "passage_max_length": 32},
        "train": {"max_steps": 2, "per_device_batch_size": 4},
        "checkpoint": {"output_dir": str(ws / "run")},
        "logging": {"progress_bar": False, "tensorboard": False},
    }))
    (ws / "notes").mkdir()
    (ws / "notes" / "keep.txt").write_text("the user's own file\n")
    (ws / "bad.jsonl").write_text(json.dumps({"query": "q", "positive": "p"}) + "\n{not json\n")
    (ws / "negative.jsonl").write_text(json.dumps({"query": "q", "positive": "p", "negative": ["n"]}) + "\n")
    (ws / "empty.jsonl").write_text("")
    (ws / "list.yaml").write_text("- a\n- b\n")
    (ws / "broken.yaml").write_text("model: [unclosed\n")
    (ws / "tasks.json").write_text(json.dumps(["not", "a", "mapping"]))
    (ws / "taxonomy.yaml").write_text("parameters: 3\n")
    (ws / "corpus3.jsonl").write_text("".join(json.dumps({"text": f"passage {i}"}) + "\n" for i in range(3)))
    no_weights = ws / "no-weights"
    shutil.copytree(reference_model_dir(), no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    # A weight file cut short (a full disk, an interrupted copy) and a folder copied in part.
    shutil.copytree(ws / "model", ws / "damaged-model")
    adapter = ws / "damaged-model" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])
    shutil.copytree(ws / "export", ws / "damaged-export")
    weights = ws / "damaged-export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(ws / "export", ws / "half-copied", ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
    shutil.copytree(tiny_llama_dir, ws / "half-backbone", ignore=shutil.ignore_patterns("tokenizer.json"))
    shutil.copytree(tiny_llama_dir, ws / "weightless-backbone", ignore=shutil.ignore_patterns("*.safetensors"))
    # A synth output whose shard lost a record's query.
    from synth.pipeline import Pipeline, Settings

    synth = Pipeline(Settings(out=str(ws / "synth-bad"), categories=["sts"]), lambda: None)
    synth.store.write(0, [{"positive": "A cat sits on a mat.", "negatives": [], "task": "sts", "meta": {"id": "x"}}],
                      [], {})
    synth.write_manifest(complete=True, num_shards=1)
    return ws


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "run" not in p.relative_to(root).parts[:1]}


# (id, command, arguments with {ws} for the workspace, what the one line must say)
CASES = [
    # ---- train
    ("train-config-missing", TRAIN, ["--config", "{ws}/nope.yaml"], r"nope\.yaml: no such config file"),
    ("train-config-not-yaml", TRAIN, ["--config", "{ws}/broken.yaml"], r"broken\.yaml: not valid YAML"),
    ("train-config-not-mapping", TRAIN, ["--config", "{ws}/list.yaml"], r"list\.yaml: the top level must be a mapping"),
    ("train-unknown-key", TRAIN, ["--config", "{ws}/config.yaml", "--set", "train.lrr=1"], r"unknown key\(s\) train\.lrr"),
    ("train-wrong-type", TRAIN, ["--config", "{ws}/config.yaml", "--set", "train.per_device_batch_size=abc"],
     r"train\.per_device_batch_size: expected an integer"),
    ("train-out-of-range", TRAIN, ["--config", "{ws}/config.yaml", "--set", "train.lr=-1"], r"train\.lr: must be > 0"),
    ("train-nan", TRAIN, ["--config", "{ws}/config.yaml", "--set", "loss.temperature=.nan"],
     r"loss\.temperature: expected a finite number"),
    ("train-set-without-value", TRAIN, ["--config", "{ws}/config.yaml", "--set", "train.lr"], r"expected KEY=VALUE"),
    ("train-no-data", TRAIN, ["--config", "{ws}/config.yaml", "--set", "data.datasets=[]"], r"data\.datasets"),
    ("train-data-missing", TRAIN, ["--config", "{ws}/config.yaml", "--set", "data.datasets=[{path: {ws}/gone.jsonl}]"],
     r"gone\.jsonl"),
    ("train-data-bad-line", TRAIN, ["--config", "{ws}/config.yaml", "--set", "data.datasets=[{path: {ws}/bad.jsonl}]"],
     r"bad\.jsonl:2"),
    ("train-data-misspelt-key", TRAIN,
     ["--config", "{ws}/config.yaml", "--set", "data.datasets=[{path: {ws}/negative.jsonl}]"],
     r"negative\.jsonl:1: field 'negative'.*did you mean 'negatives'"),
    ("train-data-empty", TRAIN, ["--config", "{ws}/config.yaml", "--set", "data.datasets=[{path: {ws}/empty.jsonl}]"],
     r"empty\.jsonl"),
    ("train-backbone-missing", TRAIN, ["--config", "{ws}/config.yaml", "--set", "model.backbone.name_or_path={ws}/nomodel"],
     r"nomodel"),
    ("train-pooling-kind", TRAIN, ["--config", "{ws}/config.yaml", "--set", "model.pooling.kind=max"], r"pooling\.kind"),
    ("train-deepspeed-config-missing", TRAIN, ["--config", "{ws}/config.yaml", "--set", "train.deepspeed={ws}/ds.json"],
     r"ds\.json"),
    ("train-resume-unknown-tag", TRAIN, ["--config", "{ws}/config.yaml", "--resume", "step-99"], r"step-99"),
    ("train-output-dir-is-a-file", TRAIN, ["--config", "{ws}/config.yaml", "--set", "checkpoint.output_dir={ws}/pairs.jsonl"],
     r"pairs\.jsonl"),
    # ---- export
    ("export-model-missing", EXPORT, ["--model", "{ws}/nomodel", "--out", "{ws}/out1"], r"nomodel"),
    ("export-model-not-a-model", EXPORT, ["--model", "{ws}/notes", "--out", "{ws}/out2"], r"notes"),
    ("export-model-is-a-file", EXPORT, ["--model", "{ws}/pairs.jsonl", "--out", "{ws}/out3"], r"pairs\.jsonl"),
    ("export-onto-its-model", EXPORT, ["--model", "{ws}/model", "--out", "{ws}/model", "--overwrite"], r"model"),
    ("export-into-its-model", EXPORT, ["--model", "{ws}/model", "--out", "{ws}/model/sub", "--overwrite"], r"model"),
    ("export-over-user-folder", EXPORT, ["--model", "{ws}/model", "--out", "{ws}/notes", "--overwrite"], r"notes"),
    ("export-over-without-overwrite", EXPORT, ["--model", "{ws}/model", "--out", "{ws}/export"], r"export"),
    ("export-bad-dtype", EXPORT, ["--model", "{ws}/model", "--out", "{ws}/out4", "--dtype", "fp8"], r"--dtype"),
    ("export-missing-vllm-python", EXPORT,
     ["--model", "{ws}/model", "--out", "{ws}/out5", "--vllm-python", "{ws}/no/python"], r"no/python"),
    # ---- evaluate
    ("evaluate-model-missing", EVALUATE, ["--model", "{ws}/nomodel", "--data", "{ws}/pairs.jsonl"], r"nomodel"),
    ("evaluate-model-not-a-model", EVALUATE, ["--model", "{ws}/notes", "--data", "{ws}/pairs.jsonl"], r"notes"),
    ("evaluate-data-missing", EVALUATE, ["--model", "{ws}/model", "--data", "{ws}/gone.jsonl"], r"gone\.jsonl"),
    ("evaluate-data-empty", EVALUATE, ["--model", "{ws}/model", "--data", "{ws}/empty.jsonl"], r"empty\.jsonl"),
    ("evaluate-data-bad-line", EVALUATE, ["--model", "{ws}/model", "--data", "{ws}/bad.jsonl"], r"bad\.jsonl:2"),
    ("evaluate-unknown-task", EVALUATE, ["--model", "{ws}/model", "--tasks", "MSMARCO"], r"--tasks: unknown task\(s\) MSMARCO"),
    ("evaluate-model-without-weights", EVALUATE, ["--model", "{ws}/no-weights", "--data", "{ws}/pairs.jsonl"],
     r"no-weights: has no weights"),
    ("evaluate-json-unwritable", EVALUATE,
     ["--model", "{ws}/model", "--data", "{ws}/pairs.jsonl", "--json", "{ws}/no/such/dir/s.json"], r"no/such/dir"),
    # ---- verify
    ("verify-missing", VERIFY, ["{ws}/noexport"], r"noexport"),
    ("verify-not-an-export", VERIFY, ["{ws}/model"], r"model"),
    ("verify-missing-vllm-python", VERIFY, ["{ws}/export", "--vllm-python", "{ws}/no/python"], r"no/python"),
    ("verify-json-unwritable", VERIFY, ["{ws}/export", "--json", "{ws}/no/such/dir/v.json"], r"no/such/dir"),
    # ---- synth
    ("synth-zero-tasks", SYNTH, ["--out", "{ws}/s1", "--num-tasks", "0"], r"--num-tasks: must be >= 1"),
    ("synth-top-p", SYNTH, ["--out", "{ws}/s2", "--top-p", "2"], r"--top-p: must be in"),
    ("synth-temperature-nan", SYNTH, ["--out", "{ws}/s3", "--temperature", "nan"], r"--temperature"),
    ("synth-unknown-category", SYNTH, ["--out", "{ws}/s4", "--categories", "poetry"], r"poetry"),
    ("synth-taxonomy-missing", SYNTH, ["--out", "{ws}/s5", "--taxonomy", "{ws}/tax.yaml"], r"tax\.yaml"),
    ("synth-taxonomy-wrong-shape", SYNTH, ["--out", "{ws}/s6", "--taxonomy", "{ws}/taxonomy.yaml"], r"taxonomy\.yaml"),
    ("synth-tasks-file-wrong-shape", SYNTH, ["--out", "{ws}/s7", "--tasks-file", "{ws}/tasks.json"], r"tasks\.json"),
    ("synth-decontaminate-missing", SYNTH, ["--out", "{ws}/s8", "--decontaminate", "{ws}/eval.txt"], r"eval\.txt"),
    ("synth-shard-index", SYNTH, ["--out", "{ws}/s9", "--num-shards", "2", "--shard-index", "2"], r"--shard-index"),
    ("synth-openai-without-url", SYNTH, ["--out", "{ws}/s10", "--backend", "openai"], r"--base-url"),
    ("synth-out-is-user-folder", SYNTH, ["--out", "{ws}/notes"], r"notes"),
    ("synth-out-is-a-file", SYNTH, ["--out", "{ws}/pairs.jsonl"], r"pairs\.jsonl"),
    ("synth-model-missing", SYNTH, ["--out", "{ws}/s11", "--model", "{ws}/nomodel", "--categories", "sts"], r"nomodel"),
    # ---- mine
    ("mine-input-missing", MINE, ["--model", "{ws}/model", "--input", "{ws}/gone.jsonl", "--out", "{ws}/m.jsonl"],
     r"gone\.jsonl"),
    ("mine-input-empty", MINE, ["--model", "{ws}/model", "--input", "{ws}/empty.jsonl", "--out", "{ws}/m.jsonl"],
     r"empty\.jsonl: no records"),
    ("mine-corpus-empty", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--corpus", "{ws}/empty.jsonl",
                                 "--out", "{ws}/m.jsonl"], r"empty\.jsonl: no passages"),
    ("mine-corpus-bad-line", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--corpus", "{ws}/bad.jsonl",
                                    "--out", "{ws}/m.jsonl"], r"bad\.jsonl:2"),
    ("mine-corpus-smaller-than-window", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--corpus",
                                               "{ws}/corpus3.jsonl", "--out", "{ws}/m.jsonl"], r"3 passages.*--ranks"),
    ("mine-model-missing", MINE, ["--model", "{ws}/nomodel", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/m.jsonl"],
     r"nomodel"),
    ("mine-model-not-a-model", MINE, ["--model", "{ws}/notes", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/m.jsonl"],
     r"notes: not a model folder"),
    ("mine-model-without-weights", MINE, ["--model", "{ws}/no-weights", "--input", "{ws}/pairs.jsonl", "--out",
                                          "{ws}/m.jsonl"], r"no-weights: has no weights"),
    ("mine-out-is-input", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/pairs.jsonl"],
     r"pairs\.jsonl: is the input"),
    ("mine-bad-ranks", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/m.jsonl",
                              "--ranks", "5:2"], r"--ranks"),
    ("mine-cross-encoder-missing", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--out",
                                          "{ws}/m.jsonl", "--cross-encoder", "{ws}/noce"], r"noce: no such cross-encoder"),
    ("mine-cross-encoder-without-weights", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--out",
                                                  "{ws}/m.jsonl", "--cross-encoder", "{ws}/no-weights"],
     r"no-weights: (has no weights|not a cross-encoder)"),
    # ---- damaged and half-copied folders, a folder where a file goes, a bad shard record
    ("merge-damaged-weights", MERGE, ["{ws}/damaged-model", "--scale", "1.5", "--out", "{ws}/merged"],
     r"damaged-model: cannot load \({ws}/damaged-model: damaged weight file"),
    ("evaluate-damaged-weights", EVALUATE, ["--model", "{ws}/damaged-export", "--data", "{ws}/pairs.jsonl"],
     r"damaged-export: damaged weight file"),
    ("evaluate-damaged-weights-st", EVALUATE, ["--model", "{ws}/damaged-export", "--backend", "sentence-transformers",
                                               "--data", "{ws}/pairs.jsonl"], r"damaged-export: damaged weight file"),
    ("evaluate-half-copied", EVALUATE, ["--model", "{ws}/half-copied", "--data", "{ws}/pairs.jsonl"],
     r"half-copied: incomplete model folder .*missing tokenizer\.json, \*\.safetensors"),
    ("mine-half-copied", MINE, ["--model", "{ws}/half-copied", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/m.jsonl"],
     r"half-copied: incomplete model folder"),
    ("export-half-copied", EXPORT, ["--model", "{ws}/half-copied", "--out", "{ws}/out6"], r"half-copied: incomplete"),
    ("train-half-copied-backbone", TRAIN, ["--config", "{ws}/config.yaml", "--set",
                                           "model.backbone.name_or_path={ws}/half-backbone"],
     r"half-backbone: incomplete model folder .*missing tokenizer\.json"),
    ("train-weightless-backbone", TRAIN, ["--config", "{ws}/config.yaml", "--set",
                                          "model.backbone.name_or_path={ws}/weightless-backbone"],
     r"weightless-backbone: incomplete model folder .*missing \*\.safetensors"),
    ("synth-half-copied-generator", SYNTH, ["--out", "{ws}/s12", "--model", "{ws}/half-backbone", "--categories", "sts"],
     r"half-backbone: incomplete model folder .*missing tokenizer\.json"),
    ("mine-out-is-a-folder", MINE, ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--out", "{ws}/notes"],
     r"--out {ws}/notes: is a folder"),
    ("synth-merge-bad-record", SYNTH_MERGE, ["--out", "{ws}/synth-bad"],
     r"part000of001-00000\.jsonl:1: .*query"),
    # ---- packaged data
    ("packaged-language", PACKAGED, ["chatterbot", "--out", "{ws}/p1", "--language", "klingon"], r"klingon"),
]


@pytest.mark.parametrize("name,command,arguments,message", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_exit_2_and_nothing_is_lost(workspace, name, command, arguments, message):
    before = _snapshot(workspace)
    argv = [a.replace("{ws}", str(workspace)) for a in arguments]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLMEMBED_VLLM_PYTHON", None)
    run = subprocess.run([sys.executable, *command, *argv], cwd=workspace, env=env, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 2, f"{name}: exit {run.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [l for l in run.stderr.splitlines() if l.startswith("error:") or ": error:" in l
              or l.startswith("config error:")]
    assert len(errors) == 1, f"{name}: expected one error line:\n{run.stderr[-3000:]}"
    assert __import__("re").search(message.replace("{ws}", str(workspace)), errors[0]), errors[0]
    after = _snapshot(workspace)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"{name} changed or removed {changed}"

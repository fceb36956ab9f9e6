"""Every command that writes, pointed at the same matrix of bad destinations: the input itself, a
folder holding an input, a place inside an input folder, a user's unrelated file or folder (with
and without --overwrite), and a link to an input. Each is refused with exit status 2 and one
`error:` line before any work, and every file that existed before is unchanged by checksum."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmembed.serve.export import export

from .test_export import trained_model
from .train_utils import REPO, write_pairs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ws(tiny_llama_dir, module_tmp) -> Path:
    from synth.pipeline import Pipeline, Settings

    ws = module_tmp("destinations")
    shutil.copytree(tiny_llama_dir, ws / "backbone")
    trained_model(ws / "backbone", "last_token", False).save(ws / "model")
    export(ws / "model", ws / "export", verify=False)
    write_pairs(ws / "pairs.jsonl", 16)
    (ws / "corpus.jsonl").write_text("".join(json.dumps({"text": f"passage number {i}"}) + "\n" for i in range(40)))
    (ws / "notes").mkdir()
    (ws / "notes" / "keep.txt").write_text("the user's own file\n")
    (ws / "mydata").mkdir()
    (ws / "mydata" / "train.jsonl").write_text(json.dumps({"query": "mine", "positive": "my own pair"}) + "\n")
    (ws / "mydata" / "heldout.jsonl").write_text(json.dumps({"query": "held", "positive": "my held-out pair"}) + "\n")
    (ws / "tasks").mkdir()
    (ws / "tasks" / "tasks.json").write_text(json.dumps({"short_long": ["Retrieve recipes for a dish"]}))
    (ws / "config.yaml").write_text(yaml.safe_dump({
        "model": {"backbone": {"name_or_path": str(ws / "backbone"), "dtype": "float32"}, "lora": {"r": 4}},
        "data": {"datasets": [{"path": str(ws / "pairs.jsonl")}], "query_max_length": 32, "passage_max_length": 32},
        "train": {"max_steps": 2, "per_device_batch_size": 4},
        "checkpoint": {"output_dir": str(ws / "run")},
        "logging": {"progress_bar": False, "tensorboard": False},
    }))
    synth = Pipeline(Settings(out=str(ws / "synth"), categories=["sts"]), lambda: None)
    synth.store.write(0, [{"query": "a cat on a mat", "positive": "A cat sits on a mat.", "negatives": [],
                           "instruction": "Retrieve", "task": "sts", "score": None, "meta": {"id": "x"}}], [], {})
    synth.write_manifest(complete=True, num_shards=1)
    for name, target in (("link-to-pairs", "pairs.jsonl"), ("link-to-model", "model"), ("link-to-export", "export"),
                         ("link-to-shards", "synth/shards")):
        (ws / name).symlink_to(ws / target)
    return ws


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _main(module: str):
    return lambda argv: __import__(module, fromlist=["main"]).main(argv)


TRAIN = [str(REPO / "launch" / "train.py"), "--config", "{ws}/config.yaml", "--set"]
PIPELINE = [str(REPO / "launch" / "pipeline.py")]
MINE = ["--model", "{ws}/model", "--input", "{ws}/pairs.jsonl", "--corpus", "{ws}/corpus.jsonl", "--ranks", "0:4",
        "--no-progress", "--out"]
EVALUATE = ["--model", "{ws}/model", "--data", "{ws}/pairs.jsonl", "--json"]
MERGE = ["{ws}/model", "--scale", "1.5", "--out"]
SYNTH_MERGE = ["--out", "{ws}/synth", "--into"]
IS, HOLDS, INSIDE = "is the input", "contains the input", "lies inside the input"

# (id, how it runs: a module's main in process or a script in a subprocess, arguments, the error line)
CASES = [
    ("train-is-input", "script", TRAIN + ["checkpoint.output_dir={ws}/pairs.jsonl"], IS),
    ("train-holds-input", "script", TRAIN + ["checkpoint.output_dir={ws}"], HOLDS),
    ("train-inside-backbone", "script", TRAIN + ["checkpoint.output_dir={ws}/backbone/run"], INSIDE),
    ("train-user-folder", "script", TRAIN + ["checkpoint.output_dir={ws}/notes"], "is not a training run folder"),
    ("train-user-file", "script", TRAIN + ["checkpoint.output_dir={ws}/notes/keep.txt"], "is a file"),
    ("train-link-to-input", "script", TRAIN + ["checkpoint.output_dir={ws}/link-to-pairs"], IS),
    ("export-is-model", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/model", "--overwrite"], IS),
    ("export-holds-model", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}", "--overwrite"], HOLDS),
    ("export-inside-model", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/model/e"], INSIDE),
    ("export-inside-backbone", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/backbone/e"], INSIDE),
    ("export-user-folder", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/notes", "--overwrite"],
     "is not an llmembed export"),
    ("export-user-file", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/notes/keep.txt", "--overwrite"],
     "is a file"),
    ("export-link-to-model", "llmembed.serve.export", ["--model", "{ws}/model", "--out", "{ws}/link-to-model",
                                                 "--overwrite"], IS),
    ("merge-is-input", "llmembed.merge", MERGE + ["{ws}/model", "--overwrite"], IS),
    ("merge-holds-input", "llmembed.merge", MERGE + ["{ws}", "--overwrite"], HOLDS),
    ("merge-inside-input", "llmembed.merge", MERGE + ["{ws}/model/merged"], INSIDE),
    ("merge-user-folder", "llmembed.merge", MERGE + ["{ws}/notes", "--overwrite"], "is not a model folder"),
    ("merge-user-file", "llmembed.merge", MERGE + ["{ws}/notes/keep.txt"], "is a file"),
    ("merge-link-to-input", "llmembed.merge", MERGE + ["{ws}/link-to-model", "--overwrite"], IS),
    ("mine-is-input", "llmembed.mine", MINE + ["{ws}/pairs.jsonl"], IS),
    ("mine-is-corpus", "llmembed.mine", MINE + ["{ws}/corpus.jsonl", "--overwrite"], IS),
    ("mine-holds-input", "llmembed.mine", MINE + ["{ws}"], HOLDS),
    ("mine-inside-model", "llmembed.mine", MINE + ["{ws}/model/mined.jsonl"], INSIDE),
    ("mine-user-file", "llmembed.mine", MINE + ["{ws}/notes/keep.txt"], "is not mined records"),
    ("mine-user-file-overwrite", "llmembed.mine", MINE + ["{ws}/notes/keep.txt", "--overwrite"],
     "is not mined records"),
    ("mine-user-folder", "llmembed.mine", MINE + ["{ws}/notes"], "is a folder"),
    ("mine-link-to-input", "llmembed.mine", MINE + ["{ws}/link-to-pairs", "--overwrite"], IS),
    ("evaluate-is-data", "llmembed.evaluate.__main__", EVALUATE + ["{ws}/pairs.jsonl", "--overwrite"], IS),
    ("evaluate-inside-model", "llmembed.evaluate.__main__", EVALUATE + ["{ws}/model/llmembed_config.json",
                                                                        "--overwrite"], INSIDE),
    ("evaluate-holds-input", "llmembed.evaluate.__main__", EVALUATE + ["{ws}"], HOLDS),
    ("evaluate-user-file", "llmembed.evaluate.__main__", EVALUATE + ["{ws}/notes/keep.txt", "--overwrite"],
     "is not a score report"),
    ("evaluate-user-folder", "llmembed.evaluate.__main__", EVALUATE + ["{ws}/notes"], "is a folder"),
    ("evaluate-link-to-input", "llmembed.evaluate.__main__", EVALUATE + ["{ws}/link-to-pairs", "--overwrite"], IS),
    ("verify-inside-export", "llmembed.serve.verify", ["{ws}/export", "--json", "{ws}/export/config.json", "--overwrite"],
     INSIDE),
    ("verify-is-export", "llmembed.serve.verify", ["{ws}/export", "--json", "{ws}/export"], IS),
    ("verify-holds-export", "llmembed.serve.verify", ["{ws}/export", "--json", "{ws}"], HOLDS),
    ("verify-user-file", "llmembed.serve.verify", ["{ws}/export", "--json", "{ws}/notes/keep.txt", "--overwrite"],
     "is not a report"),
    ("verify-link-to-export", "llmembed.serve.verify", ["{ws}/export", "--json", "{ws}/link-to-export"], IS),
    ("synth-is-input", "synth.generate", ["--decontaminate", "{ws}/notes/keep.txt", "--out", "{ws}/notes/keep.txt"],
     IS),
    ("synth-holds-input", "synth.generate", ["--tasks-file", "{ws}/tasks/tasks.json", "--out", "{ws}/tasks"], HOLDS),
    ("synth-inside-model", "synth.generate", ["--model", "{ws}/backbone", "--out", "{ws}/backbone/synth"], INSIDE),
    ("synth-user-folder", "synth.generate", ["--out", "{ws}/notes"], "is not a synth output folder"),
    ("synth-user-file", "synth.generate", ["--out", "{ws}/pairs.jsonl"], "is a file"),
    ("synth-link-to-input", "synth.generate", ["--decontaminate", "{ws}/pairs.jsonl", "--out", "{ws}/link-to-pairs"],
     IS),
    ("synth-merge-is-input", "synth.merge", SYNTH_MERGE + ["{ws}/synth/shards"], IS),
    ("synth-merge-holds-input", "synth.merge", SYNTH_MERGE + ["{ws}/synth", "--overwrite"], HOLDS),
    ("synth-merge-inside-input", "synth.merge", SYNTH_MERGE + ["{ws}/synth/shards/merged"], INSIDE),
    ("synth-merge-user-data", "synth.merge", SYNTH_MERGE + ["{ws}/mydata"], "is not a merged synth set"),
    ("synth-merge-user-data-overwrite", "synth.merge", SYNTH_MERGE + ["{ws}/mydata", "--overwrite"],
     "is not a merged synth set"),
    ("synth-merge-user-file", "synth.merge", SYNTH_MERGE + ["{ws}/notes/keep.txt"], "is a file"),
    ("synth-merge-link-to-input", "synth.merge", SYNTH_MERGE + ["{ws}/link-to-shards"], IS),
    ("pipeline-user-folder", "script", PIPELINE + ["--out", "{ws}/notes"], "is not a pipeline folder"),
    ("pipeline-user-file", "script", PIPELINE + ["--out", "{ws}/pairs.jsonl"], "is a file"),
    ("pipeline-holds-input", "script", PIPELINE + ["--train-config", "{ws}/config.yaml", "--out", "{ws}"], HOLDS),
    ("pipeline-inside-teacher", "script", PIPELINE + ["--teacher", "{ws}/model", "--out", "{ws}/model/p"], INSIDE),
    ("packaged-user-folder", "llmembed.data.packaged", ["chatterbot", "--out", "{ws}/mydata"],
     "is not a folder written by this tool"),
    ("packaged-user-folder-overwrite", "llmembed.data.packaged", ["chatterbot", "--out", "{ws}/mydata", "--overwrite"],
     "is not a folder written by this tool"),
    ("packaged-user-file", "llmembed.data.packaged", ["chatterbot", "--out", "{ws}/notes/keep.txt"], "is a file"),
]


@pytest.mark.parametrize("name,runner,arguments,message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_destination_is_refused_and_nothing_is_touched(ws, capsys, name, runner, arguments, message):
    before = _snapshot(ws)
    argv = [a.replace("{ws}", str(ws)) for a in arguments]
    if runner == "script":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run([sys.executable, *argv], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
        code, err = run.returncode, run.stderr
        assert "Traceback" not in run.stdout + err, (run.stdout + err)[-3000:]
    else:
        capsys.readouterr()
        code = __import__(runner, fromlist=["main"]).main(argv)
        err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:") or line.startswith("config error:")]
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    assert len(errors) == 1, f"{name}: expected one error line:\n{err[-3000:]}"
    assert re.search(re.escape(message), errors[0]), errors[0]
    after = _snapshot(ws)
    assert before == after, f"{name} changed {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}"


def test_every_writing_command_is_in_the_matrix():
    commands = {c[1] if c[1] != "script" else Path(c[2][0]).stem for c in CASES}
    assert commands == {"train", "pipeline", "llmembed.serve.export", "llmembed.merge", "llmembed.mine",
                        "llmembed.evaluate.__main__", "llmembed.serve.verify", "synth.generate", "synth.merge",
                        "llmembed.data.packaged"}

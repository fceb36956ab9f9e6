"""The main job (launch/pipeline.py and launch/stages/): the text checks on synthetic pairs
before the teacher's score filter (synth.filters, each rejection counted by reason), its
settings, and when a finished stage is skipped."""

from __future__ import annotations

import json
import sys

from launch import pipeline
from launch.stages import data, runner, training
from launch.stages.runner import Job, Stage
from launch.stages.settings import PipelineSettings
from synth.filters import text_check_file
from synth.split import split_by_passage

from .train_utils import REPO


def test_sanity_filter_drops_what_a_small_generator_writes_and_counts_it(tmp_path, capsys):
    good = {"query": "how do plants make food", "positive": "Plants make food by photosynthesis in their leaves."}
    rows = [
        good,
        {"query": "boolean", "positive": "true"},  # seen in a CI run of the 135M generator
        {"query": "what is 2+2 = ?", "positive": "2 + 2 = 4 ; 3 + 3 = 6 ; 4 + 4 = 8 ; 5 + 5 = 10"},
        {"query": "tell me about cats", "positive": "cats cats cats cats cats cats cats cats cats cats"},
        {"query": "the same text twice here", "positive": ["The same text twice here"]},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_check_file(source, target)
    kept = [json.loads(l) for l in target.read_text().splitlines()]
    assert kept == [good]
    out = capsys.readouterr().out
    assert "kept 1" in out and "'too_short': 1" in out and "'few_letters': 1" in out and "'repetitive': 1" in out


def test_every_shipped_training_config_loads_with_the_pipelines_overrides(tmp_path):
    """The CPU and GPU pipeline configs (and the other shipped recipes) hold only known keys
    and legal values, with the data and output overrides the pipeline adds."""
    from llmembed.train.config import load_config

    overrides = [f"checkpoint.output_dir={tmp_path / 'run'}", "loss.teacher_model=/models/teacher",
                 f"data.datasets=[{{path: {tmp_path / 'mixed.jsonl'}, name: mixed, group_size: 2}}]"]
    configs = sorted((REPO / "launch" / "configs").glob("*.yaml"))
    assert {"pipeline.yaml", "pipeline_gpu.yaml"} <= {c.name for c in configs}
    for path in configs:
        config = load_config(path, overrides)
        assert config.data.datasets[0].path == str(tmp_path / "mixed.jsonl")
    gpu = load_config(REPO / "launch" / "configs" / "pipeline_gpu.yaml", overrides)
    assert gpu.train.deepspeed == "zero3" and gpu.model.backbone.dtype == "bfloat16"
    cpu = load_config(REPO / "launch" / "configs" / "pipeline.yaml", overrides)
    assert cpu.train.pack_tokens == 512 and cpu.train.length_buckets == 1 and cpu.model.backbone.name_or_path == "default"


def test_pipeline_command_line_maps_onto_its_settings(tmp_path, capsys):
    import pytest

    cpu = pipeline.settings_of(pipeline.parse([]))
    assert cpu == PipelineSettings() and cpu.synth_languages == ["English"] and cpu.cross_encoder is None
    assert cpu.seeds == [42] and cpu.merge_scale == 1.25
    gpu = pipeline.settings_of(pipeline.parse([
        "--procs", "8", "--train-config", str(REPO / "launch" / "configs" / "pipeline_gpu.yaml"),
        "--synth-backend", "vllm", "--generator", "Qwen/Qwen2.5-7B-Instruct", "--synth-arg=--tensor-parallel-size=8",
        "--synth-languages", "--teacher", "/m/bge", "--cross-encoder", "/m/reranker", "--ranks", "10:100",
        "--seeds", "1", "--merge-scale", "1"]))
    assert gpu.procs == 8 and gpu.synth_backend == "vllm" and gpu.synth_languages == []
    assert gpu.synth_args == ["--tensor-parallel-size=8"] and gpu.cross_encoder == "/m/reranker"
    assert gpu.train_config.name == "pipeline_gpu.yaml" and gpu.ranks == "10:100" and gpu.seeds == [1]
    assert gpu.merge_scale == 1.0
    assert cpu.corpus is None and cpu.query_kinds == ["question"] and not cpu.invent and not cpu.relevance
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a passage"}\n')
    own = pipeline.settings_of(pipeline.parse(["--corpus", str(docs), "--query-kinds", "question", "keywords",
                                               "--queries-per-passage", "2", "--relevance", "--round-trip-k", "3"]))
    assert own.corpus == docs and own.query_kinds == ["question", "keywords"] and own.queries_per_passage == 2
    assert own.relevance and own.round_trip_k == 3
    for bad, named in ((["--train-config", str(tmp_path / "nope.yaml")], "nope.yaml"), (["--procs", "0"], "--procs"),
                       (["--seeds", "7", "7"], "each seed once"), (["--merge-scale", "0"], "--merge-scale"),
                       (["--corpus", str(tmp_path / "none.jsonl")], "none.jsonl"),
                       (["--corpus", str(docs), "--invent"], "pick one")):
        with pytest.raises(SystemExit):
            pipeline.parse(bad)
        assert named in capsys.readouterr().err


def test_a_finished_stage_is_skipped_until_its_command_or_an_input_file_changes(tmp_path):
    job = Job(tmp_path / "out", PipelineSettings())
    config, log = tmp_path / "train.yaml", tmp_path / "runs.log"
    config.write_text("train: {lr: 1.0e-3}\n")
    command = [[sys.executable, "-c", f"open({str(log)!r}, 'a').write('ran ')"]]
    job.run(Stage("train", command, inputs=(config,)))
    job.run(Stage("train", command, inputs=(config,)))
    assert log.read_text() == "ran "
    config.write_text("train: {lr: 2.0e-3}\n")  # same command line, edited config
    job.run(Stage("train", command, inputs=(config,)))
    job.run(Stage("train", command, inputs=(config,)))
    assert log.read_text() == "ran ran "
    assert runner.fingerprint(config) != runner.fingerprint(tmp_path / "absent.yaml")
    export = tmp_path / "export"  # a folder input: any file's content or name counts
    (export / "sub").mkdir(parents=True)
    (export / "sub" / "weights.bin").write_bytes(b"1")
    job.run(Stage("serve", command, inputs=(export,)))
    job.run(Stage("serve", command, inputs=(export,)))
    (export / "sub" / "weights.bin").write_bytes(b"2")
    job.run(Stage("serve", command, inputs=(export,)))
    assert log.read_text() == "ran " * 4


def test_a_stage_whose_output_is_gone_or_whose_teacher_changed_runs_again(tmp_path):
    """A stage declares what it reads (the teacher folder included, though only its name is on
    the command line) and what it writes: deleting an output or retraining the teacher reruns it."""
    job = Job(tmp_path / "out", PipelineSettings())
    teacher, log, mined = tmp_path / "teacher", tmp_path / "runs.log", tmp_path / "mined.jsonl"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"v1")
    command = [[sys.executable, "-c", f"open({str(log)!r}, 'a').write('ran '); open({str(mined)!r}, 'w')"]]
    for _ in range(2):
        job.run(Stage("mine", command, inputs=(teacher,), outputs=(mined,)))
    assert log.read_text() == "ran "
    mined.unlink()
    job.run(Stage("mine", command, inputs=(teacher,), outputs=(mined,)))
    assert log.read_text() == "ran ran " and mined.is_file()
    (teacher / "model.safetensors").write_bytes(b"v2")  # retrained in place
    job.run(Stage("mine", command, inputs=(teacher,), outputs=(mined,)))
    job.run(Stage("mine", command, inputs=(teacher,), outputs=(mined,)))
    assert log.read_text() == "ran ran ran "


def test_urls_are_recorded_and_printed_without_their_credentials(tmp_path, capsys):
    job = Job(tmp_path / "out", PipelineSettings())
    url = "http://alice:hunter2@127.0.0.1:9/v1?token=tok-123&v=1"
    job.run(Stage("synth", [[sys.executable, "-c", "pass", "--base-url", url, f"--synth-arg=--base-url={url}"]]))
    shown = capsys.readouterr().out + (tmp_path / "out" / "stages" / "synth.json").read_text()
    assert "hunter2" not in shown and "tok-123" not in shown and "alice" not in shown
    assert "http://***@127.0.0.1:9/v1?token=***&v=***" in shown


def test_the_pipeline_evaluates_and_exports_the_last_stages_model(tmp_path):
    import yaml

    single = REPO / "launch" / "configs" / "pipeline.yaml"
    out = [f"checkpoint.output_dir={tmp_path / 'run'}", "loss.teacher_model=/models/teacher"]
    assert training.final_model_dir(single, out) == tmp_path / "run" / "final"
    staged = yaml.safe_load(single.read_text())
    staged["stages"] = [{"name": "weak", "loss": {"structure_weight": 0.0}}, {"name": "supervised"}]
    (tmp_path / "staged.yaml").write_text(yaml.safe_dump(staged))
    assert training.final_model_dir(tmp_path / "staged.yaml", out) == tmp_path / "run" / "supervised" / "final"


def test_the_synthetic_split_holds_out_whole_passages_and_the_corpus_holds_no_question(tmp_path):
    train = tmp_path / "train.jsonl"
    pairs = [{"query": f"question {n}?", "positive": f"answer {n}"} for n in range(200)]
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    corpus = tmp_path / "corpus.jsonl"
    data.write_answers_corpus(train, corpus)
    rows = [json.loads(l) for l in corpus.read_text().splitlines()]
    assert [r["text"] for r in rows] == [p["positive"] for p in pairs] and "question" not in corpus.read_text()
    # two queries per passage; a query's positive may have moved to another passage
    relabelled = [{"query": f"q{n}-{k}", "positive": f"answer {(n + k) % 200}",
                   "meta": {"relabel": {"positive_passage_id": f"answer{(n + k) % 200}"}}}
                  for n in range(200) for k in range(2)]
    source = tmp_path / "relabelled.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in relabelled))
    fit, held = tmp_path / "fit.jsonl", tmp_path / "held.jsonl"
    split_by_passage(source, fit, held)
    fit_rows = [json.loads(l) for l in fit.read_text().splitlines()]
    held_rows = [json.loads(l) for l in held.read_text().splitlines()]
    assert len(fit_rows) + len(held_rows) == 400 and 10 <= len(held_rows) <= 80
    assert not {r["positive"] for r in fit_rows} & {r["positive"] for r in held_rows}


def test_an_in_process_stage_is_recorded_by_its_function_and_skipped_like_a_command(tmp_path):
    """Small file steps run in process (no hidden command-line modes): the record names the
    function and its arguments, and the same rules decide when the step is done."""
    job = Job(tmp_path / "out", PipelineSettings())
    a, b, mixed = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "mixed.jsonl"
    a.write_text('{"query": "q1", "positive": "p1"}\n')
    b.write_text('{"query": "q2", "positive": "p2"}\n{"query": "q3", "positive": "p3"}\n')
    stage = Stage("combine", call=data.concatenate, args=(mixed, a, b), inputs=(a, b), outputs=(mixed,))
    job.run(stage)
    assert mixed.read_text() == a.read_text() + b.read_text()
    record = json.loads((tmp_path / "out" / "stages" / "combine.json").read_text())
    assert record["commands"] == [["launch.stages.data.concatenate", str(mixed), str(a), str(b)]]
    mixed.write_text("edited by hand\n")
    job.run(stage)  # done: same work, same inputs, output present
    assert mixed.read_text() == "edited by hand\n"
    b.write_text('{"query": "q4", "positive": "p4"}\n')
    job.run(stage)
    assert mixed.read_text() == a.read_text() + b.read_text()

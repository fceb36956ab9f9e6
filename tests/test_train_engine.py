"""The DeepSpeed trainer in real processes (CPU, gloo): ZeRO-2/3 with LoRA, cross-device
negatives equal to one big batch, exact resume after the whole run is killed from outside."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llmembed.serve.export import export
from llmembed.model import EmbeddingModel
from llmembed.train import checkpoint

from .train_utils import (
    TOPICS,
    launch,
    launch_and_kill,
    logged_steps,
    metrics,
    write_config,
    write_pairs,
)

pytestmark = pytest.mark.integration

PROBE = {"queries": ["tell me about the river number 3", "tell me about the piano"],
         "passages": ["This passage describes the river in detail.", "Unrelated text on coffee."],
         "instruction": "Retrieve the passage"}


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("stage,launcher", [("zero2", "deepspeed"), ("zero3", "torchrun")])
def test_two_process_lora_training_saves_and_exports_what_it_trained(tiny_dir, tmp_path, stage, launcher):
    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    (tmp_path / "probe.json").write_text(json.dumps(PROBE))
    # ZeRO-3 also runs with (non-reentrant) gradient checkpointing.
    train = {"deepspeed": stage, "max_steps": 8, "lr": 2e-3, "gradient_checkpointing": stage == "zero3"}
    config = write_config(tmp_path, tiny_dir, [data], train=train,
                          logging={"probe_file": str(tmp_path / "probe.json")})
    launch(config, procs=2, launcher=launcher)
    run = tmp_path / "run"
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    reference = json.loads((run / "probe_embeddings.json").read_text())
    model = EmbeddingModel.load(run / "final")
    queries = model.encode(PROBE["queries"], instruction=PROBE["instruction"])
    passages = model.encode(PROBE["passages"])
    assert _cos(queries, reference["queries"]).min() >= 0.9999
    assert _cos(passages, reference["passages"]).min() >= 0.9999
    # The adapter really holds trained weights (ZeRO-3 must gather them before saving).
    from safetensors.torch import load_file

    adapter = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 0
    out = export(run / "final", tmp_path / "export")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert _cos(st.encode(PROBE["passages"]), reference["passages"]).min() >= 0.9999


def test_cross_device_negatives_equal_one_big_batch(tiny_dir, tmp_path):
    """2 processes x batch 4 with gathered negatives == 1 process x batch 8, step by step; and
    the same again with length buckets, which only cut padding."""
    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs = {}
    for name, procs, batch, buckets in (("two", 2, 4, 1), ("one", 1, 8, 1), ("two_bucketed", 2, 4, 3)):
        folder = tmp_path / name
        folder.mkdir()
        train = {"per_device_batch_size": batch, "max_steps": 4, "length_buckets": buckets}
        config = write_config(folder, tiny_dir, [data], train=train, loss={"symmetric": True})
        launch(config, procs=procs)
        runs[name] = metrics(folder / "run")
    assert [m["step"] for m in runs["two"]] == [m["step"] for m in runs["one"]] == [1, 2, 3, 4]
    for name in ("two", "two_bucketed"):
        for a, b in zip(runs[name], runs["one"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (runs[name], runs["one"])
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, b["grad_norm"])
    assert runs["two_bucketed"][-1]["padding_share"] < runs["two"][-1]["padding_share"]


def test_grad_cache_steps_equal_plain_steps_under_zero2_and_zero3(tiny_dir, tmp_path):
    """GradCache (chunks of 3 queries; batches of 8 and 4 do not divide evenly) against the plain
    step on one process: same losses, gradient norms and trained adapter, on 1 process (ZeRO-2),
    on 2 processes with cross-device negatives (ZeRO-2), and on 2 under ZeRO-3 with gradient
    checkpointing. Dropout is off here (a chunked forward draws other masks than one forward);
    test_grad_cache.py checks the replayed dropout."""
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs, adapters = {}, {}
    for name, procs, batch, chunk, stage in (("plain", 1, 8, None, "zero2"), ("cached_one", 1, 8, 3, "zero2"),
                                             ("cached_two", 2, 4, 3, "zero2"), ("cached_zero3", 2, 4, 3, "zero3")):
        (tmp_path / name).mkdir()
        # Two micro-batches of 8 queries per step either way (2 x 4 with gathered negatives).
        train = {"per_device_batch_size": batch, "gradient_accumulation_steps": 2, "max_steps": 4,
                 "deepspeed": stage, "gradient_checkpointing": stage == "zero3"}
        config = write_config(tmp_path / name, tiny_dir, [data], train=train,
                              loss={"symmetric": True, "grad_cache_chunk": chunk})
        launch(config, procs=procs)
        runs[name] = metrics(tmp_path / name / "run")
        adapters[name] = load_file(str(tmp_path / name / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    assert [m["step"] for m in runs["plain"]] == [1, 2, 3, 4]
    for name in ("cached_one", "cached_two", "cached_zero3"):
        for a, b in zip(runs[name], runs["plain"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (name, runs[name], runs["plain"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (name, runs[name], runs["plain"])
        for key, tensor in adapters["plain"].items():
            assert (adapters[name][key] - tensor).norm() <= 1e-5 * tensor.norm(), (name, key)


def test_balanced_ranks_equal_one_process_holding_every_ranks_negatives(tiny_dir, tmp_path):
    """Conan's cross-rank balancing: 2 processes sharing 4 queries, each drawing its own one of
    every record's 2 hard negatives (group 2), give step by step the loss and gradient norm of
    one process with the same 4 queries and both negatives in each group (group 3), with the
    same candidates masked by a teacher's guide."""
    from llmembed.serve.encoders import reference_model_dir

    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(32):
            t = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"query": f"tell me about the {t} number {i}",
                                "positive": f"This passage describes the {t} in detail, item {i}.",
                                # Even records get a planted false negative: their query, nearly verbatim.
                                "negatives": [f"Tell me about the {t}, number {i}." if i % 2 == 0 else
                                              f"A passage about a {TOPICS[(i + 3) % 16]}, item {i}.",
                                              f"Unrelated text on {TOPICS[(i + 5) % 16]}, number {i}."]}) + "\n")
    runs = {}
    for name, procs, group in (("balanced", 2, 2), ("one", 1, 3)):
        (tmp_path / name).mkdir()
        # GISTEmbed's guide on: the teacher's vectors follow the same gathered layout.
        loss = {"symmetric": True, "teacher_model": str(reference_model_dir()), "guided_masking": True}
        config = write_config(tmp_path / name, tiny_dir, [tmp_path / "pairs.jsonl"], loss=loss,
                              data={"group_size": group, "balanced_ranks": True}, train={"max_steps": 4})
        launch(config, procs=procs)
        runs[name] = metrics(tmp_path / name / "run")
    assert [m["step"] for m in runs["balanced"]] == [m["step"] for m in runs["one"]] == [1, 2, 3, 4]
    for a, b in zip(runs["balanced"], runs["one"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (runs["balanced"], runs["one"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, b["grad_norm"])
        assert a["masked_negatives"] == b["masked_negatives"]
    assert sum(m["masked_negatives"] for m in runs["one"]) > 0


def test_resume_after_kill_replays_the_same_steps(tiny_dir, tmp_path):
    """SIGKILL the launcher and both ranks from outside, mid-run after a checkpoint; resuming
    gives the losses and LRs of an uninterrupted run, and a metrics log without gaps or repeats."""
    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    lora = {"r": 4, "dropout": 0.1}  # dropout on: the RNG state must be restored too
    steps = list(range(1, 9))
    runs = {}
    for name in ("straight", "crashed"):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_dir, [data], model={"lora": lora},
                                  train={"max_steps": len(steps)},
                                  checkpoint={"output_dir": str(tmp_path / name / "run"), "save_every": 2})
    launch(runs["straight"], procs=2)
    reference = metrics(tmp_path / "straight" / "run")
    assert [m["step"] for m in reference] == steps

    run_dir = tmp_path / "crashed" / "run"

    def past_a_checkpoint() -> bool:
        # A checkpoint is complete (its `latest` marker exists) and a later step is logged:
        # the kill then also cuts the log, which the resumed run must trim back.
        tag = checkpoint.latest_tag(run_dir / "checkpoints")
        logged = logged_steps(run_dir)
        return tag is not None and bool(logged) and logged[-1] > int(tag.removeprefix(checkpoint.TAG_PREFIX))

    launch_and_kill(runs["crashed"], past_a_checkpoint, procs=2, extra=["--resume", "auto"])
    killed_at = logged_steps(run_dir)
    assert killed_at == list(range(1, len(killed_at) + 1)) and len(killed_at) < len(steps), killed_at
    assert not (run_dir / "final").exists()

    out = launch(runs["crashed"], procs=2, extra=["--resume", "auto"]).stdout
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert 2 <= resumed_from < len(steps), out[-3000:]
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == steps  # no duplicates, no gaps
    for a, b in zip(resumed, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (resumed, reference)
        assert a["lr"] == b["lr"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == len(steps)

    # The same checkpoints under a config that trains differently: refused in one line, before
    # anything loads; a change to how often it saves is not a different run.
    refused = launch(runs["crashed"], procs=1, launcher="python", check=False,
                     extra=["--resume", "auto", "--set", "train.lr=2e-3", "--set", "checkpoint.save_every=3"])
    assert refused.returncode == 2 and "Traceback" not in refused.stdout, refused.stdout[-2000:]
    assert "holds a run trained with another config (train.lr: 0.001 -> 0.002)" in refused.stdout


def test_config_changes_name_each_setting_that_differs_except_where_and_how_often_a_run_writes(tmp_path):
    saved = {"train": {"lr": 1e-3, "seed": 3}, "loss": {"temperature": 0.05}, "checkpoint": {"save_every": 2},
             "logging": {"log_every": 1}}
    same_math = {**saved, "checkpoint": {"save_every": 5}, "logging": {"log_every": 10},
                 "train": {"lr": 1e-3, "seed": 3, "max_steps": 12}}  # a longer run: still a resume
    assert checkpoint.config_changes(saved, same_math) == []
    other = {**saved, "train": {"lr": 2e-3, "seed": 3}, "loss": {"temperature": 0.02, "kind": "kl"}}
    assert checkpoint.config_changes(saved, other) == ["loss.kind: None -> 'kl'", "loss.temperature: 0.05 -> 0.02",
                                                       "train.lr: 0.001 -> 0.002"]
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
    checkpoint.check_same_run(tmp_path, same_math)
    with pytest.raises(ValueError, match=r"another config \(loss.kind.*train.lr: 0.001 -> 0.002\)"):
        checkpoint.check_same_run(tmp_path, other)
    checkpoint.check_same_run(tmp_path / "fresh", other)  # nothing saved: nothing to compare


def test_hard_negatives_are_remined_in_training_and_a_killed_run_resumes_with_them(tiny_dir, tmp_path):
    """Conan re-mining on 2 processes: 16 records, each seen every 2 steps; as training makes
    their negatives easy, re-mining at step 4 replaces them with the current model's, the
    losses then leave those of a run without re-mining, and a run SIGKILLed after that
    re-mining and resumed reproduces the uninterrupted run's losses (<= 1e-6)."""
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    original = {json.loads(l)["query"]: json.loads(l) for l in data.read_text().splitlines()}
    remine = {"every": 4, "rank_start": 0, "rank_end": 10}
    runs = {}
    for name, every in (("straight", 4), ("crashed", 4), ("never", 0)):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_dir, [data], loss={"temperature": 0.1},
                                  model={"lora": {"r": 4, "dropout": 0.1}}, remine={**remine, "every": every},
                                  train={"max_steps": 8, "lr": 2e-3},
                                  checkpoint={"output_dir": str(tmp_path / name / "run"), "save_every": 2,
                                              "keep_last": 3})
    launch(runs["straight"], procs=2)
    launch(runs["never"], procs=2)
    reference, plain = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "never" / "run")
    assert [m["step"] for m in reference] == list(range(1, 9))
    assert reference[3]["remined"] > 0 and all(m["remined"] == 0 for m in reference[:3]), reference
    assert reference[-1]["remined_total"] >= reference[3]["remined"]
    state = json.loads((tmp_path / "straight" / "run" / "checkpoints" / "step-4" / "remine_state.json").read_text())
    assert len(state["replaced"]) == reference[3]["remined"]
    records = [json.loads(l) for l in data.read_text().splitlines()]
    corpus = {t for r in records for t in [r["positive"], *r["negatives"]]}
    for _, row, negatives in state["replaced"]:
        record = original[records[row]["query"]]
        assert negatives != record["negatives"] and set(negatives) <= corpus - {record["positive"]}
    # Same run up to the re-mining; the new negatives change the losses after it.
    for a, b in zip(reference[:4], plain[:4], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(reference[4:], plain[4:], strict=True)) > 1e-3

    run_dir = tmp_path / "crashed" / "run"

    def past_the_remining() -> bool:
        tag = checkpoint.latest_tag(run_dir / "checkpoints")
        logged = logged_steps(run_dir)
        return tag is not None and int(tag.removeprefix(checkpoint.TAG_PREFIX)) >= 4 and logged[-1] > 4

    launch_and_kill(runs["crashed"], past_the_remining, procs=2, extra=["--resume", "auto"])
    assert not (run_dir / "final").exists()
    out = launch(runs["crashed"], procs=2, extra=["--resume", "auto"]).stdout
    assert int(re.search(r"resumed from \S+ at step (\d+)", out).group(1)) >= 4, out[-3000:]
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(resumed, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (resumed, reference)
        assert a["remined_total"] == b["remined_total"]


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tiny_dir, tmp_path):
    """A torn file in the newest checkpoint, an empty `latest` marker and a torn last metrics
    line: `--resume auto` reports them and continues from the older intact checkpoint, with the
    losses and LRs of an uninterrupted run."""
    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs = {}
    for name in ("straight", "damaged"):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_dir, [data], model={"lora": {"r": 4, "dropout": 0.1}},
                                  train={"max_steps": 6},
                                  checkpoint={"output_dir": str(tmp_path / name / "run"), "save_every": 2,
                                              "keep_last": 3})
        launch(runs[name], launcher="python")
    reference = metrics(tmp_path / "straight" / "run")
    root = tmp_path / "damaged" / "run" / "checkpoints"
    assert checkpoint.resume_candidates(root) == ["step-4", "step-2"]
    states = sorted((root / "step-4").glob("*model_states.pt"))
    assert states
    states[0].write_bytes(states[0].read_bytes()[: states[0].stat().st_size // 2])
    (root / "latest").write_text("")
    with open(tmp_path / "damaged" / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a kill mid-write

    out = launch(runs["damaged"], launcher="python", extra=["--resume", "auto"]).stdout
    assert re.search(r"warning: checkpoint \S+step-4 could not be loaded", out), out[-3000:]
    assert "resumed from" in out and re.search(r"resumed from \S+step-2 at step 2", out), out[-3000:]
    resumed = metrics(tmp_path / "damaged" / "run")
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == list(range(1, 7))
    for a, b in zip(resumed, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (resumed, reference)
        assert a["lr"] == b["lr"]


def test_a_second_trainer_on_the_same_folder_is_refused(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 500})
    run_dir = tmp_path / "run"
    second = {}

    def second_run_refused() -> bool:
        if not logged_steps(run_dir):
            return False
        second["run"] = launch(config, launcher="python", check=False, timeout=300)
        return True

    launch_and_kill(config, second_run_refused, launcher="python")
    result = second["run"]
    assert result.returncode == 2, result.stdout[-3000:]
    assert re.search(r"is in use by another training run \(PID \d+\)", result.stdout), result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # the refused run wrote nothing into the log


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_in_a_deepspeed_checkpoint_never_runs(tiny_dir, tmp_path):
    """DeepSpeed's own files are read with weights_only=True (ZeRO-3 here; ZeRO-2 resumes in the
    tests above): a code-running pickle in the newest checkpoint is refused without running,
    ``--resume auto`` falls back to the older one, and naming it is one line, exit 2."""
    import torch

    data = write_pairs(tmp_path / "pairs.jsonl", 32)
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 5, "deepspeed": "zero3"},
                          checkpoint={"output_dir": str(tmp_path / "run"), "save_every": 2, "keep_last": 3})
    launch(config, launcher="python")
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.resume_candidates(root) == ["step-4", "step-2"]
    marker = tmp_path / "payload-ran"
    optim = sorted((root / "step-4").glob("*optim_states.pt"))
    assert len(optim) == 1
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, optim[0])

    named = launch(config, launcher="python", extra=["--resume", "step-4"], check=False)
    assert named.returncode == 2, named.stdout[-3000:]
    assert re.search(r"error: --resume step-4: checkpoint \S+step-4 could not be loaded \(UnsafeCheckpoint: \S+optim_states.pt holds (io|builtins).open besides tensors", named.stdout), named.stdout[-2000:]
    assert "Traceback" not in named.stdout and not marker.exists()

    out = launch(config, launcher="python", extra=["--resume", "auto"]).stdout
    assert not marker.exists()
    assert re.search(r"warning: checkpoint \S+step-4 could not be loaded", out), out[-3000:]
    assert re.search(r"resumed from \S+step-2 at step 2", out), out[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_ranks_die_with_a_killed_launcher_and_the_rerun_continues(tiny_dir, tmp_path):
    """SIGKILL only the torchrun launcher (as an OOM kill or a closed terminal would): its ranks
    go too, instead of writing on; the rerun with --resume auto takes the folder and continues
    without gaps or duplicates."""
    import os
    import signal
    import tempfile
    import time

    import psutil

    from .processes import kill_tree
    from .train_utils import start

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    # Far more steps than run in the test's time: surviving ranks would still be training.
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 100_000},
                          checkpoint={"output_dir": str(tmp_path / "run"), "save_every": 2, "keep_last": 2})
    run_dir = tmp_path / "run"
    with tempfile.TemporaryFile("w+") as log:
        proc = start(config, log, procs=2, launcher="torchrun")
        try:
            deadline = time.monotonic() + 300
            while len(logged_steps(run_dir)) < 3:
                assert proc.poll() is None and time.monotonic() < deadline, "training ended or timed out"
                time.sleep(0.05)
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
            assert len(ranks) == 2
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            gone, alive = psutil.wait_procs(ranks, timeout=20)
            assert not alive, f"ranks outlived their launcher: {[p.pid for p in alive]}"
        finally:
            kill_tree(proc)
    steps_at_kill = logged_steps(run_dir)
    time.sleep(1)
    assert logged_steps(run_dir) == steps_at_kill  # nothing writes after the kill
    launch(config, procs=2, launcher="torchrun", extra=["--resume", "auto", "--set", "train.max_steps=12"])
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 13))


def test_evaluation_during_zero3_training_logs_keeps_the_best_and_changes_nothing(tiny_dir, tmp_path):
    """Two ZeRO-3 processes evaluate the suite's English retrieval every 2 steps: the scores go
    to eval.jsonl and TensorBoard, the best model is kept and scores the same when reloaded,
    and the losses equal those of the same run without evaluation (the RNG is restored)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmembed.serve.encoders import load_encoder
    from llmembed.evaluate import runner

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs = {}
    for name, evaluation in (("plain", {}), ("evaluated", {"every": 2, "tasks": ["ChatterbotRetrieval.en"],
                                                           "keep_best": True})):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_dir, [data], model={"lora": {"r": 4, "dropout": 0.1}},
                              train={"max_steps": 6, "deepspeed": "zero3"}, evaluation=evaluation,
                              logging={"progress_bar": False, "tensorboard": True})
        launch(config, procs=2, launcher="torchrun")
        runs[name] = tmp_path / name / "run"
    plain, evaluated = metrics(runs["plain"]), metrics(runs["evaluated"])
    assert [m["loss"] for m in evaluated] == [m["loss"] for m in plain]
    lines = [json.loads(l) for l in (runs["evaluated"] / "eval.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    assert all(0.0 < l["scores"]["ChatterbotRetrieval.en"]["ndcg_at_10"] <= 1.0 for l in lines)
    best = json.loads((runs["evaluated"] / "best.json").read_text())
    assert best["average"] == max(l["average"] for l in lines)
    reloaded = runner.run(load_encoder(runs["evaluated"] / "best"), ["ChatterbotRetrieval.en"])
    assert abs(runner.average(reloaded) - best["average"]) < 1e-4
    events = EventAccumulator(str(runs["evaluated"] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/ChatterbotRetrieval.en/ndcg_at_10")] == [2, 4, 6]
    assert not (runs["plain"] / "eval.jsonl").exists()


def test_a_grad_cache_run_resumed_from_a_checkpoint_replays_the_same_steps(tiny_dir, tmp_path):
    """GradCache with LoRA dropout on 2 processes: a run stopped after its step-3 checkpoint and
    resumed to step 6 logs the uninterrupted run's losses (the RNG the chunks replay comes back
    with the checkpoint)."""
    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    runs = {}
    for name, steps in (("straight", 6), ("stopped", 4)):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_dir, [data], model={"lora": {"r": 4, "dropout": 0.1}},
                                  loss={"grad_cache_chunk": 3}, train={"max_steps": steps, "schedule": "constant"},
                                  checkpoint={"output_dir": str(tmp_path / name / "run"), "save_every": 3})
        launch(runs[name], procs=2)
    launch(runs["stopped"], procs=2, extra=["--resume", "auto", "--set", "train.max_steps=6"])
    straight, resumed = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "stopped" / "run")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, straight, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (resumed, straight)


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_world_size_with_the_same_global_batch(tiny_dir, tmp_path, saved_on, resumed_on):
    """Killed after a checkpoint on N processes, resumed on M with the per-process batch that
    keeps the global batch (8): the same batches (the data order is a function of the step and
    the global batch), the optimizer state re-partitioned through DeepSpeed's universal
    checkpoint, and the losses of an uninterrupted run. Not bit-identical: N processes x B
    gather their embeddings before the loss, which sums in another order than one process x NB
    (the same 1e-5 as test_cross_device_negatives_equal_one_big_batch); with dropout the ranks'
    random streams would differ too, so dropout is off."""
    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    steps = list(range(1, 9))
    runs = {}
    for name in ("straight", "moved"):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_dir, [data], train={"max_steps": len(steps),
                                  "per_device_batch_size": 8 // saved_on},
                                  checkpoint={"output_dir": str(tmp_path / name / "run"), "save_every": 2})
    launch(runs["straight"], procs=saved_on)
    reference = metrics(tmp_path / "straight" / "run")
    run_dir = tmp_path / "moved" / "run"

    def past_a_checkpoint() -> bool:
        tag = checkpoint.latest_tag(run_dir / "checkpoints")
        logged = logged_steps(run_dir)
        return tag is not None and bool(logged) and logged[-1] > int(tag.removeprefix(checkpoint.TAG_PREFIX))

    launch_and_kill(runs["moved"], past_a_checkpoint, procs=saved_on, extra=["--resume", "auto"])
    assert not (run_dir / "final").exists()

    # The saved per-process batch on the new world size: another global batch, refused in one line.
    wrong = launch(runs["moved"], procs=resumed_on, check=False, extra=["--resume", "auto"])
    assert wrong.returncode != 0, wrong.stdout[-3000:]  # (torchrun adds its own report of the rank's exit)
    assert f"error: --resume: {run_dir / 'checkpoints'}" in wrong.stdout and f"this run has {resumed_on} x {8 // saved_on}: set train.per_device_batch_size={8 // resumed_on}" in wrong.stdout

    out = launch(runs["moved"], procs=resumed_on,
                 extra=["--resume", "auto", "--set", f"train.per_device_batch_size={8 // resumed_on}"]).stdout
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert 2 <= resumed_from < len(steps), out[-3000:]
    assert f"was saved by {saved_on} process(es); loading it on {resumed_on} through DeepSpeed's universal" in out
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == steps
    for a, b in zip(resumed, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (resumed, reference)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, b["grad_norm"]), (resumed, reference)
        assert a["lr"] == b["lr"]

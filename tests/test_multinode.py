"""Several nodes, proven on one machine: two torchrun "nodes" on localhost (node ranks 0 and 1,
so the local rank repeats across nodes) train exactly what one node with as many processes
trains, every file of the run is written by one rank only, and a run whose second node was
killed resumes on both nodes to the uninterrupted result.

The classic multi-node bugs all mistake the local rank for the global one: two nodes writing
the same files, or drawing the same shard of the data. Both would show here: the first in the
audit of written files, the second as losses that differ from the one-node run (whose ranks draw
disjoint rows of every batch; see tests/test_data.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmembed.train import checkpoint

from .processes import kill_tree
from .train_utils import REPO, _env, free_port, launch, logged_steps, metrics, write_config, write_pairs

pytestmark = pytest.mark.integration

# Loaded by every Python process of a run (sitecustomize on PYTHONPATH): logs each file opened
# for writing under the run folder, with the writer's global rank.
AUDIT = '''
import os, sys
_RUN, _LOG = os.environ["LLMEMBED_AUDIT_RUN"], os.environ["LLMEMBED_AUDIT_LOG"]
def _written(event, args):
    if event != "open" or not isinstance(args[1], str) or not set(args[1]) & set("wax+"):
        return
    path = os.path.abspath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
    if path.startswith(_RUN):
        with open(_LOG, "a") as log:
            log.write(f"{os.environ.get('RANK', '-')}\\t{path}\\n")
sys.addaudithook(_written)
'''


def _node_command(config: Path, launcher: str, node: int, per_node: int, port: int, extra: list[str]) -> list[str]:
    """One node's launcher, as the README's multi-node section runs it."""
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *extra]
    if launcher == "deepspeed":  # DeepSpeed without SSH: each node starts its own, told its node rank
        hostfile = config.parent / "hostfile"
        hostfile.write_text(f"localhost slots={per_node}\n127.0.0.1 slots={per_node}\n")  # two names, one machine
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), *script]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port), *script]


def _start_nodes(config: Path, per_node: int, audit: Path | None = None, extra: list[str] | None = None,
                 launcher: str = "torchrun"):
    """Both nodes' launchers, each in a session of its own (as on two machines)."""
    env = _env(None)
    if audit is not None:
        (audit / "site").mkdir(parents=True, exist_ok=True)
        (audit / "site" / "sitecustomize.py").write_text(AUDIT)
        env.update(PYTHONPATH=f"{audit / 'site'}:{env.get('PYTHONPATH', '')}",
                   LLMEMBED_AUDIT_RUN=str(config.parent / "run"), LLMEMBED_AUDIT_LOG=str(audit / "writes.tsv"))
    port = free_port()
    logs = [open(config.parent / f"node{n}.log", "w") for n in range(2)]
    procs = [subprocess.Popen(_node_command(config, launcher, n, per_node, port, extra or []), cwd=config.parent, env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for n, log in enumerate(logs)]
    return procs, logs


def _wait(procs, logs, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            kill_tree(proc)
        for log in logs:
            log.close()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, Path(log.name).read_text()[-6000:]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))


def _config(folder: Path, tiny_dir: Path, data: Path, per_rank_batch: int) -> Path:
    folder.mkdir()
    return write_config(folder, tiny_dir, [data], model={"lora": {"r": 4, "dropout": 0.1}},
                        train={"per_device_batch_size": per_rank_batch, "max_steps": 6},
                        checkpoint={"output_dir": str(folder / "run"), "save_every": 2})


@pytest.mark.parametrize("launcher,per_node", [("torchrun", 1), ("torchrun", 2), ("deepspeed", 1)])
def test_two_nodes_train_what_one_node_trains_and_each_file_has_one_writer(tiny_dir, tmp_path, launcher, per_node):
    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    one = _config(tmp_path / "one_node", tiny_dir, data, 4)
    launch(one, procs=2 * per_node)
    two = _config(tmp_path / "two_nodes", tiny_dir, data, 4)
    _wait(*_start_nodes(two, per_node, audit=tmp_path / "audit", launcher=launcher))

    reference, nodes = metrics(one.parent / "run"), metrics(two.parent / "run")
    assert [m["step"] for m in nodes] == [1, 2, 3, 4, 5, 6]  # each step logged once: one writer
    for a, b in zip(nodes, reference, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (nodes, reference)
    ours, theirs = _adapter(two.parent / "run"), _adapter(one.parent / "run")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    writers: dict[str, set[str]] = defaultdict(set)
    for line in (tmp_path / "audit" / "writes.tsv").read_text().splitlines():
        rank, path = line.split("\t")
        writers[path].add(rank)
    shared = {path: ranks for path, ranks in writers.items() if len(ranks) > 1}
    assert writers and not shared, shared
    assert {"0"} == writers[str(two.parent / "run" / "metrics.jsonl")]
    assert {"1"} <= set.union(*writers.values())  # the second node's ranks write their own files
    # Per-rank checkpoint files carry global ranks: one of each rank, none twice.
    root = two.parent / "run" / "checkpoints"
    tag = root / checkpoint.latest_tag(root)
    ranks = 2 * per_node
    assert sorted(p.name for p in tag.glob("rng_state_rank*.json")) == sorted(
        f"rng_state_rank{r}.json" for r in range(ranks))
    assert len(list(tag.rglob("*optim_states.pt"))) == ranks


def test_a_run_whose_second_node_died_resumes_on_both_nodes_to_the_uninterrupted_result(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    straight = _config(tmp_path / "straight", tiny_dir, data, 4)
    _wait(*_start_nodes(straight, 1))
    crashed = _config(tmp_path / "crashed", tiny_dir, data, 4)
    run = crashed.parent / "run"
    procs, logs = _start_nodes(crashed, 1, extra=["--resume", "auto"])
    try:
        deadline = time.monotonic() + 600
        while checkpoint.latest_tag(run / "checkpoints") is None:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the end"
            time.sleep(0.05)
        kill_tree(procs[1])  # the second node is lost (preempted, powered off)
        procs[0].wait(timeout=300)  # the first node's collective fails: it stops by itself
    finally:
        for proc in procs:
            kill_tree(proc)
        for log in logs:
            log.close()
    assert procs[0].returncode != 0 and not (run / "final").exists()
    killed_at = logged_steps(run)
    assert len(killed_at) < 6, killed_at

    _wait(*_start_nodes(crashed, 1, extra=["--resume", "auto"]))
    assert "resumed from" in (crashed.parent / "node0.log").read_text()
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(run), metrics(straight.parent / "run"), strict=True):
        assert a["loss"] == b["loss"], (a, b)
    ours, theirs = _adapter(run), _adapter(straight.parent / "run")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

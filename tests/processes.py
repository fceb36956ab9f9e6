"""Run a command in its own process group and always stop it, and everything it started, by PID."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], env: dict, cwd, timeout: float, what: str = "command",
              check: bool = True) -> subprocess.CompletedProcess:
    """stdout+stderr together; on timeout or exit every process of the group is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output, _ = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout}s:\n{output[-5000:]}")
    finally:
        kill_tree(proc)  # launchers' children included
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{output[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every descendant, and wait until all are gone.

    The group alone is not enough: torchrun starts each rank in a session of its own, so
    ranks would outlive a killed launcher and keep writing checkpoints and metrics."""
    import psutil  # a DeepSpeed dependency; imported here so free_port users need not have it

    members = []
    if proc.poll() is None:  # not reaped: the PID is still ours (at worst a zombie), its tree too
        try:
            root = psutil.Process(proc.pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for member in members:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(members, timeout=60)
    assert not alive, f"processes survived SIGKILL: {alive}"

"""Run a command in its own process group and always stop the whole group by PID."""

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
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout}s:\n{output[-5000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # launchers' children included
        except ProcessLookupError:
            pass
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{output[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")

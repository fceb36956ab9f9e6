"""Ranks die with their launcher.

torchrun and DeepSpeed's launcher start each rank as a child process; when the launcher is
killed (SIGKILL, an OOM kill, a closed terminal), Linux leaves the ranks running, still
writing checkpoints and metrics, and a rerun then finds its folder locked. A rank asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``). Our checkpoints and metrics
are written so that a kill at any moment leaves a resumable run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def launched() -> bool:
    """True in a rank started by torchrun or the DeepSpeed launcher (not a plain ``python``)."""
    return "LOCAL_RANK" in os.environ and "RANK" in os.environ


def tie_to_launcher() -> bool:
    """Make this rank die when its launcher does; True if that is now in force."""
    if not launched() or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the request took hold
        os.kill(os.getpid(), signal.SIGKILL)
    return True

"""One writer per output folder: an exclusive ``flock`` held for the life of the process.

The OS drops the lock when the process dies, however it dies (SIGKILL, OOM, a lost node), so
there is never a stale lock to clear by hand; a second writer is refused with the holder's
PID. Standard library only: ``synth`` imports it in the vLLM environment.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class FolderInUse(ValueError):
    """Another live process holds the lock; the message names its PID."""


def hold(folder: Path, name: str, what: str, hint: str) -> IO[str]:
    """Lock ``folder/name`` for this process and return the open handle (keep a reference:
    closing it, or the process ending, releases the lock). ``what`` names the other holder's
    kind of job and ``hint`` what the user can do, for the refusal message."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderInUse(f"{folder} is in use by another {what} (PID {holder}); {hint}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle

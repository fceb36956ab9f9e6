"""Putting a finished folder where a previous one stood, for commands that rewrite their output.

A model or an export is written into a staging folder beside its destination and moved into
place only when complete, so a killed command leaves the previous folder or none, never a
half-written one that a later stage would load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out`` (same parent folder), replacing a previous ``out``.

    The previous folder is first renamed aside, then removed, so ``out`` is at every moment
    either the old folder, absent, or the new one.
    """
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

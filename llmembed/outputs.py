"""Where a command writes: one policy for every output a user points a command at.

The README promises that a command never loses a user's file. Every command that writes
(train, export, merge, mine, evaluate ``--json``, verify ``--json``, synth.generate, synth.merge,
the pipeline, the packaged-data tool) keeps that promise through this module:

- **No output touches an input.** An output may not be, contain or lie inside any input of the
  same command. Paths are compared after resolving links and ``..``, and by device and inode as
  well, so a symbolic link, a hard link or a bind mount does not get around the rule.
- **Replacing needs consent, and only of the command's own kind.** An existing output is
  replaced only with ``--overwrite``, and only when it is what the command writes (a model
  folder for merge, a JSON report for ``--json``...): never a user's other file or folder. An
  empty folder counts as absent. Outputs that a rerun continues (a training run, a synth
  folder, a pipeline folder) are accepted as they are when they are of the command's kind.
- **Nothing half-written.** Files and folders are written into a staging entry beside the
  target and renamed into place when complete: a killed command leaves the old output or the
  new one. Staged files get the permissions of any new file (the user's umask), not the 0600
  that temporary files are created with.
- **Nothing left behind.** A live writer holds an ``flock`` on its staging entry; the OS drops
  it when the process dies, however it dies. The next command writing to the same place removes
  every staging entry it can lock: those are what killed runs left.

Standard library only: synth uses it in the vLLM environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

STAGING_TAG = ".llmembed-staging-"


class OutputError(ValueError):
    """An output path the command must not write to; the message names it and why."""


@dataclass(frozen=True)
class Kind:
    """What a command writes at an output path, so an existing one can be recognised.

    ``noun`` names it in messages ("a model folder"); ``recognise`` says whether an existing
    path is one (only called on a path of the right type: a folder for ``folder`` kinds, a
    file otherwise)."""

    noun: str
    folder: bool
    recognise: Callable[[Path], bool]


def any_json_with(*keys: str) -> Callable[[Path], bool]:
    """A recogniser for a JSON report: an object holding every one of ``keys``."""

    def recognise(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and all(key in data for key in keys)

    return recognise


def folder_with(*names: str) -> Callable[[Path], bool]:
    """A recogniser for a folder holding every one of ``names`` (files or folders)."""
    return lambda path: all((path / name).exists() for name in names)


# ---------------------------------------------------------------------- the check
def check_output(out: str | Path, *, inputs: Iterable[str | Path | None], kind: Kind, overwrite: bool = False,
                 flag: str = "--out", continues: bool = False) -> Path:
    """Refuse ``out`` (raising :class:`OutputError`, before any work) unless writing there can
    lose nothing: see the module docstring. ``inputs`` are every file and folder the command
    reads (``None`` and paths that do not exist are skipped). ``continues``: an existing output
    of ``kind`` is continued by a rerun rather than replaced, so it needs no ``--overwrite``.
    Stale staging entries of killed runs beside ``out`` are removed on the way."""
    out = Path(out)
    for source in inputs:
        if source is None or str(source) == "":
            continue
        relation = _relation(out, Path(source))
        if relation is not None:
            raise OutputError(f"{flag} {out}: {relation} the input {source}; write it somewhere else")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{flag} {out}: is a broken link; remove it or choose another path")
    if out.exists():
        if kind.folder and not out.is_dir():
            raise OutputError(f"{flag} {out}: is a file, expected a folder ({kind.noun})")
        if not kind.folder and out.is_dir():
            raise OutputError(f"{flag} {out}: is a folder, expected a file ({kind.noun})")
        empty = out.is_dir() and not any(out.iterdir())
        if not empty:
            if not kind.recognise(out):
                raise OutputError(f"{flag} {out}: exists and is not {kind.noun}; it is never replaced, "
                                  "choose another path")
            if not (overwrite or continues):
                raise OutputError(f"{flag} {out}: exists ({kind.noun}); pass --overwrite to replace it")
    elif not out.absolute().parent.is_dir():
        if not kind.folder:
            raise OutputError(f"{flag} {out}: no such folder {out.parent}")
    remove_stale_staging(out)
    return out


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(path: Path) -> set[tuple[int, int]]:
    """Device and inode of every existing folder above ``path`` (its parents, resolved)."""
    found = set()
    for parent in path.absolute().parents:
        identity = _identity(parent)
        if identity is not None:
            found.add(identity)
    return found


def _relation(out: Path, source: Path) -> str | None:
    """How ``out`` relates to the input ``source``: "is", "lies inside", "contains" or None."""
    if not source.exists():
        return None
    out_path, source_path = out.resolve(), source.resolve()
    out_id, source_id = _identity(out), _identity(source)
    if out_path == source_path or (out_id is not None and out_id == source_id):
        return "is"
    if source_path in out_path.parents or source_id in _lineage(out_path):
        return "lies inside"
    if out_path in source_path.parents or (out_id is not None and out_id in _lineage(source_path)):
        return "contains"
    return None


# ---------------------------------------------------------------------- staging
def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging entries killed writers of ``out`` left beside it (those no live
    process holds a lock on); return them."""
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.glob(f".{out.name}{STAGING_TAG}*"):
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue  # a live writer
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_file(out: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A handle to a staging file beside ``out``, renamed onto ``out`` when the block ends
    without an error (flushed and synced first) and removed otherwise."""
    out = Path(out)
    remove_stale_staging(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}{STAGING_TAG}", dir=out.absolute().parent)
    _lock(fd)
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, out)  # under the lock: a concurrent cleaner never sees it unlocked
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(out: str | Path, text: str) -> None:
    """Write ``text`` to ``out`` through a staging file (see :func:`staged_file`)."""
    with staged_file(out) as handle:
        handle.write(text)


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A staging folder beside ``out`` to build a whole output in; it replaces ``out`` when
    the block ends without an error (see :func:`swap_into_place`) and is removed otherwise."""
    out = Path(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_TAG}", dir=out.absolute().parent))
    os.chmod(staging, 0o777 & ~_umask())
    fd = os.open(staging, os.O_RDONLY)
    _lock(fd)
    try:
        yield staging
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder ``staging`` to ``out`` (same parent folder), replacing a
    previous ``out``. The previous folder is first renamed aside into a locked staging entry,
    then removed, so ``out`` is at every moment the old folder, absent, or the new one, and a
    kill between the two steps leaves an entry the next run removes."""
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_TAG}old-", dir=out.absolute().parent))
    fd = os.open(aside, os.O_RDONLY)
    _lock(fd)
    try:
        os.replace(out, aside / out.name)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(aside / out.name, out)  # put the previous output back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        os.close(fd)  # a leftover aside is now unlocked: the next run removes it

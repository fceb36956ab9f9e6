"""Running a stage: what it reads, what it writes, what it runs, and when it is done.

A stage is done when it ran before with the same work on the same inputs (every file and folder
it reads, by content: an edited config, a regenerated data file or a retrained teacher reruns
it though its command line is unchanged) and its outputs are all still there (a deleted output
is made again). ``<out>/stages/<stage>.json`` records the work, the inputs' fingerprints and the
wall time; nothing in it holds a credential.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmembed.outputs import write_text
from llmembed.serve.encoders import folder_fingerprint
from launch.stages.settings import REPO, PipelineSettings
from synth.backends.openai_backend import redact_url

PY = sys.executable


@dataclass
class Stage:
    """One step: its commands (the project's own command lines, run in order) or an in-process
    ``call(*args)`` for small file work, what it reads and what it writes."""

    name: str
    commands: list[list[str]] = field(default_factory=list)
    call: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    inputs: tuple[Path | str | None, ...] = ()
    outputs: tuple[Path, ...] = ()

    def work(self) -> list[list[str]]:
        """The work as printed and recorded: the commands with URLs stripped of credentials, or
        the call by its function's qualified name and arguments."""
        if self.call is not None:
            return [[f"{self.call.__module__}.{self.call.__qualname__}", *map(str, self.args)]]
        return [[shown(arg) for arg in command] for command in self.commands]


class Job:
    """One pipeline run: its folder, its settings, and the stages it has run (with their times)."""

    def __init__(self, out: Path, settings: PipelineSettings) -> None:
        self.out = out
        self.settings = settings
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.data = out / "data"
        self.data.mkdir(exist_ok=True)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.times: dict[str, float] = {}
        # The training processes' rendezvous port, one per output folder: two pipelines on one
        # machine do not both take DeepSpeed's default, and a rerun keeps its command unchanged.
        self.port = 29500 + 1 + int(hashlib.sha256(str(out).encode()).hexdigest()[:8], 16) % 2000

    def run(self, stage: Stage) -> None:
        """Run ``stage`` unless it is done (module docstring)."""
        marker = self.stages / f"{stage.name}.json"
        work = stage.work()
        inputs_now = {str(p): fingerprint(Path(p)) for p in stage.inputs if p is not None}
        if marker.is_file():
            done = json.loads(marker.read_text())
            missing = [str(p) for p in stage.outputs if not p.exists()]
            if done.get("commands") == work and done.get("inputs", {}) == inputs_now and not missing:
                self.times[stage.name] = done["wall_s"]
                print(f"[pipeline] {stage.name}: done before, skipped", flush=True)
                return
            if missing:
                print(f"[pipeline] {stage.name}: output {missing[0]} is missing; running it again", flush=True)
        print(f"[pipeline] {stage.name} ...", flush=True)
        started = time.perf_counter()
        if stage.call is not None:
            print("  > " + " ".join(work[0]), flush=True)
            stage.call(*stage.args)
        for command, line in zip(stage.commands, work if stage.call is None else []):
            print("  $ " + " ".join(line), flush=True)
            result = subprocess.run(command, cwd=REPO, env=self.env)
            if result.returncode != 0:
                raise SystemExit(f"[pipeline] stage {stage.name} failed (exit {result.returncode}); fix and rerun: "
                                 "finished stages are kept")
        self.times[stage.name] = round(time.perf_counter() - started, 1)
        write_text(marker, json.dumps({"commands": work, "inputs": inputs_now, "wall_s": self.times[stage.name]},
                                      indent=2))


def fingerprint(*paths: Path) -> str:
    """sha256 over the files' contents; a folder counts as its files (names and contents, large
    weight files by their ends: :func:`llmembed.serve.encoders.folder_fingerprint`), a missing
    path as empty."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_dir():
            digest.update(folder_fingerprint(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(b"\0")
    return digest.hexdigest()


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def shown(arg: str) -> str:
    """A command-line argument fit to print and record: URLs in it lose their credentials."""
    if "://" not in arg:
        return arg
    return _URL.sub(lambda match: redact_url(match.group(0)), arg)


def count_records(path: Path) -> int:
    """Non-blank lines of a JSONL file."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())

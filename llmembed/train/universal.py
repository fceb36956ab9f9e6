"""A checkpoint in DeepSpeed's universal form, which any number of processes can load.

A ZeRO checkpoint holds each process's share of the optimizer state, so it loads only on the
world size that saved it; a preempted job that comes back on another allocation could not
resume. DeepSpeed's ``ds_to_universal`` rewrites a checkpoint as one file per parameter (its
fp32 value and optimizer moments, whole), which an engine with any world size loads and
re-partitions. We convert a checkpoint only when a resume needs it, once, into
``checkpoints/universal/<tag>``, reading every file weights-only (the converter itself unpickles).

    python -m llmembed.train.universal CHECKPOINT_TAG_DIR OUT_DIR
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from llmembed.train.safe_load import weights_only_torch_load

UNIVERSAL_DIR = "universal"


def universal_copy(root: Path, tag: str) -> Path:
    """``root/universal/<tag>``, converted from ``root/<tag>`` unless it already is. Called on one
    rank; the others wait at a barrier."""
    target = root / UNIVERSAL_DIR / tag
    if (target / "zero").is_dir():
        return target
    partial = root / UNIVERSAL_DIR / f"{tag}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "llmembed.train.universal", str(root / tag), str(partial)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{root / tag}: conversion to DeepSpeed's universal checkpoint failed ({last})")
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    source, out = (argv if argv is not None else sys.argv[1:])[:2]
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", source, "--output_folder", out, "--inject_missing_state",
                "--num_extract_workers", "1", "--num_merge_workers", "1"]
    with weights_only_torch_load():
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

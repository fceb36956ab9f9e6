"""The training command line, shared by ``launch/train.py`` and ``python -m llmembed.train``.

    deepspeed launch/train.py --config launch/configs/quickstart.yaml [--set train.lr=1e-4] [--resume auto]
    deepspeed --module llmembed.train --config ...       (an installed llmembed, no checkout)
    torchrun --nproc_per_node 2 -m llmembed.train --config ...
    python -m llmembed.train --config ...                (one process)

Errors a user can fix (config, data, missing files) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llmembed trainer (DeepSpeed ZeRO, LoRA/QLoRA, contrastive losses)")
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint, if any) or a checkpoint tag")
    parser.add_argument("--skip-invalid", action="store_true", help="skip bad records and report the count")
    # The deepspeed launcher passes --local_rank; the rank itself comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from llmembed.train.launcher import tie_to_launcher

    tie_to_launcher()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from llmembed.config import ConfigError
    from llmembed.data.schema import DataError
    from llmembed.train.config import load_plan

    try:
        plan = load_plan(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from llmembed.train.engine import train

    for stage in plan:
        if stage.name:
            # A finished stage wrote summary.json last: a rerun goes on with the next one.
            if (Path(stage.config.checkpoint.output_dir) / "summary.json").is_file():
                print(f"stage {stage.name}: finished before, skipped", flush=True)
                continue
            print(f"stage {stage.name} -> {stage.config.checkpoint.output_dir}", flush=True)
        try:
            train(stage.config, resume=args.resume, skip_invalid=args.skip_invalid)
        except (DataError, ValueError, OSError) as err:  # OSError: a path that cannot be read or written
            print(f"error: {f'stage {stage.name}: ' if stage.name else ''}{err}", file=sys.stderr)
            return 2
    from llmembed.distributed import leave_group_and_exit

    leave_group_and_exit()
    return 0

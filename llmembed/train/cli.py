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
    from llmembed.train.config import load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from llmembed.train.engine import train

    try:
        train(config, resume=args.resume, skip_invalid=args.skip_invalid)
    except (DataError, ValueError, OSError) as err:  # OSError: a path that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

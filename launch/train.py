"""Train an embedding model.

    deepspeed launch/train.py --config launch/configs/quickstart.yaml [--set train.lr=1e-4] [--resume auto]
    torchrun --nproc_per_node 2 launch/train.py --config ...
    python launch/train.py --config ...            (one process)
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
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train an embedding model.

    deepspeed launch/train.py --config launch/configs/quickstart.yaml [--set train.lr=1e-4] [--resume auto]
    torchrun --nproc_per_node 2 launch/train.py --config ...
    python launch/train.py --config ...            (one process)

The same command as ``python -m llmembed.train`` (see llmembed/train/cli.py), which an
installed llmembed runs without this checkout.
"""

from __future__ import annotations

from llmembed.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

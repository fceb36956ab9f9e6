"""``python -m llmembed.train``: the trainer of an installed llmembed (see :mod:`llmembed.train.cli`)."""

from llmembed.train.cli import main

raise SystemExit(main())

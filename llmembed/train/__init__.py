"""The DeepSpeed trainer: config, setup, step, loop, checkpoints, saving, logging (one job a module)."""

"""The DeepSpeed training engine: config, loop, checkpoints, logging."""

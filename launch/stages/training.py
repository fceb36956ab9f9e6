"""Training: LoRA on the default backbone under DeepSpeed ZeRO-2 on ``--procs`` processes, once
per seed; then the seeds' models averaged weight by weight with the average's change from the
backbone scaled by ``--merge-scale`` (``llmembed.merge --method linear --scale``). One seed at
scale 1 skips the merge."""

from __future__ import annotations

from pathlib import Path

from llmembed.train.config import load_plan
from launch.stages.runner import PY, REPO, Job, Stage, fingerprint


def final_model_dir(config: Path, overrides: list[str]) -> Path:
    """Where training leaves its model: ``<output_dir>/final``, or for a config with stages
    (each trained into its own folder) the last stage's."""
    return Path(load_plan(config, overrides)[-1].config.checkpoint.output_dir) / "final"


def train(job: Job, mixed: Path, teacher: str) -> Path:
    """The model the later stages evaluate and ship."""
    opts = job.settings
    config = opts.train_config
    # One run folder per (config, data, seed): an edited config trains anew instead of resuming
    # checkpoints made under the old one, and every later stage follows the new folder.
    key = fingerprint(config, mixed)[:10]
    finals = []
    for seed in opts.seeds:
        overrides = [f"checkpoint.output_dir={job.out / f'run-{key}-seed{seed}'}", f"loss.teacher_model={teacher}",
                     f"train.seed={seed}", f"data.datasets=[{{path: {mixed}, name: mixed, group_size: 2}}]"]
        final = final_model_dir(config, overrides)
        job.run(Stage(f"train_seed{seed}", [[PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(opts.procs),
                                             "--master_port", str(job.port), str(REPO / "launch" / "train.py"),
                                             "--config", str(config), "--resume", "auto",
                                             *(arg for o in overrides for arg in ("--set", o))]],
                      inputs=(config, mixed, teacher), outputs=(final,)))
        finals.append(final)
    if len(finals) == 1 and opts.merge_scale == 1.0:
        return finals[0]
    merged = job.out / f"merged-{key}"  # a model soup, its change from the base scaled
    job.run(Stage("merge", [[PY, "-m", "llmembed.merge", *map(str, finals), "--method", "linear",
                             "--scale", f"{opts.merge_scale:g}", "--overwrite", "--out", str(merged)]],
                  inputs=tuple(finals), outputs=(merged,)))
    return merged

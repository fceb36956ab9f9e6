#!/usr/bin/env bash
# The main job, from nothing to an evaluated, served model, on CPU and offline (see
# launch/pipeline.py): synthetic data -> filters -> mined negatives -> DeepSpeed LoRA training on
# 2 processes -> offline suite before/after with a reference row -> export -> verify -> serve.
# Rerun the same command after an interruption: finished stages are skipped, training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python launch/pipeline.py "$@"

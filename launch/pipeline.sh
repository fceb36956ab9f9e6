#!/usr/bin/env bash
# The main job, from nothing to an evaluated, served model, on CPU and offline (see
# launch/pipeline.py and launch/stages/): synthetic data -> filters -> mined negatives -> DeepSpeed LoRA training on
# 2 processes -> offline suite before/after with a reference row -> export -> verify -> serve.
# Rerun the same command after an interruption: finished stages are skipped, training resumes.
#   bash launch/pipeline.sh               # verify compares our encode, sentence-transformers, transformers
#   bash launch/pipeline.sh --with-vllm   # also builds .venv-vllm (~3.4 GB) and checks real vLLM
# Other options go to launch/pipeline.py (see python -m launch.pipeline --help).
set -euo pipefail
cd "$(dirname "$0")/.."
setup=()
if [ "${1:-}" = "--with-vllm" ]; then
  setup=(--with-vllm)
  shift
fi
bash launch/setup_env.sh "${setup[@]}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m launch.pipeline "$@"

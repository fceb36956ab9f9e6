#!/usr/bin/env bash
# The main job on the built-in default, on CPU, offline:
#   1. packaged real data (chatterbot-corpus question/answer pairs) -> runs/quickstart/data
#   2. DeepSpeed ZeRO-2 + LoRA training of SmolLM2-135M-Instruct    -> runs/quickstart/run
#   3. held-out retrieval scores, untrained vs trained
#   4. merged export for sentence-transformers and vLLM              -> runs/quickstart/export
#      checked by llmembed.serve.verify (real vLLM too when .venv-vllm exists: setup_env.sh --with-vllm)
# Rerunning continues from the last checkpoint (--resume auto). Extra arguments go to
# launch/train.py, e.g. --set train.max_steps=10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
$PY -m llmembed.data.packaged chatterbot --out runs/quickstart/data --overwrite
PATH="$PWD/.venv/bin:$PATH" deepspeed launch/train.py --config launch/configs/quickstart.yaml --resume auto "$@"
$PY -m llmembed.evaluate --model runs/quickstart/run/final --data runs/quickstart/data/heldout.jsonl --baseline \
    --json runs/quickstart/scores.json --overwrite
VLLM=()
if [ -x .venv-vllm/bin/python ]; then VLLM=(--vllm-python .venv-vllm/bin/python); fi
$PY -m llmembed.serve.export --model runs/quickstart/run/final --out runs/quickstart/export --overwrite "${VLLM[@]}"
echo "done: model runs/quickstart/run/final, export runs/quickstart/export, scores runs/quickstart/scores.json"

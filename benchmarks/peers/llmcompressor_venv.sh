#!/usr/bin/env bash
# Creates (or reuses) the llm-compressor peer venv, ~/.cache/lowbit-peers/llmcompressor by default, with torch==2.13.0 pinned.
# llm-compressor is never a lowbit dependency: benchmarks/peers/llmcompressor_sparsity.py runs inside this venv.
set -euo pipefail
VENV=${1:-${VENVS:-$HOME/.cache/lowbit-peers}/llmcompressor}
LOCK=${LOCK:-${VENVS:-$HOME/.cache/lowbit-peers}/.lock}
mkdir -p "$(dirname "$VENV")"
flock "$LOCK" bash -c "
  set -euo pipefail
  test -x '$VENV/bin/python' || python3 -m venv '$VENV'
  '$VENV/bin/pip' install -q torch==2.13.0
  '$VENV/bin/pip' install -q llmcompressor 'torch==2.13.0'
"
"$VENV/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"

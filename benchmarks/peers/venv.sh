#!/usr/bin/env bash
# Create (or reuse) a peer toolkit's own venv, ~/.cache/lowbit-peers/NAME, with torch==2.13.0 pinned; peers are never
# lowbit dependencies. Usage: benchmarks/peers/venv.sh NAME PACKAGE...   (e.g. venv.sh hqq hqq)
set -euo pipefail
NAME=${1:?venv name}; shift
VENV=${VENVS:-$HOME/.cache/lowbit-peers}/$NAME
mkdir -p "$(dirname "$VENV")"
flock "${VENVS:-$HOME/.cache/lowbit-peers}/.lock" bash -c "
  set -euo pipefail
  test -x '$VENV/bin/python' || python3 -m venv '$VENV'
  '$VENV/bin/pip' install -q torch==2.13.0
  '$VENV/bin/pip' install -q 'torch==2.13.0' $*
"
"$VENV/bin/python" -c "import torch, transformers; print('$NAME venv: torch', torch.__version__, 'transformers', transformers.__version__)"

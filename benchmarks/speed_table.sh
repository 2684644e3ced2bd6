#!/usr/bin/env bash
# GPTQ compression time, lowbit against llm-compressor on the same work (docs/scale.md, "Compression time"):
# the embedded model, W4 g64 asymmetric, act-order with static groups, damp 0.01, 64 x 512 WikiText-2 windows
# (the same windows for both), 2 threads, run one after the other; then where lowbit's time goes.
# Usage: VENVS=/path/to/peer/venvs bash benchmarks/speed_table.sh OUT      (run it alone on the machine)
set -euo pipefail
OUT=${1:?output folder}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
PY=${PY:-.venv/bin/python}
HERE=$(dirname "$0")
R=recipes/wo-gptq-static.yaml
MODEL=$("$PY" -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())")
mkdir -p "$OUT/runs"
[ -f "$OUT/calib.pt" ] || "$PY" "$HERE/peers/to_run.py" windows "$R" "$OUT/calib.pt"
[ -d "$OUT/runs/lowbit" ] || "$PY" -m lowbit run "$R" --out "$OUT/runs/lowbit" --quiet
[ -f "$OUT/llmc/peer_metrics.json" ] || "$VENVS/llmcompressor/bin/python" "$HERE/peers/llmcompressor_run.py" \
  "$MODEL" "$OUT/calib.pt" "$OUT/llmc" --method gptq --threads 2
[ -d "$OUT/runs/llmc" ] || "$PY" "$HERE/peers/to_run.py" import "$R" "$OUT/llmc" "$OUT/runs/llmc"
[ -d "$OUT/runs/lowbit-nodiag" ] || "$PY" -m lowbit run "$R" --set diagnostics=false --out "$OUT/runs/lowbit-nodiag" --quiet
"$PY" -m lowbit report "$OUT"/runs/*/ | tee "$OUT/table.md"
"$PY" "$HERE/time_split.py" "$R" --set diagnostics=false | tee "$OUT/split.md"

#!/usr/bin/env bash
# Block-reconstruction table of docs/results.md (issue 5): RTN, GPTQ, AdaRound, BRECQ, QDrop at W2A16 g64,
# W3A16 per-channel, W4A4 and W2A4 (recipes/recon-*.yaml: 16 x 128 calibration, 16384 test tokens, CPU defaults
# of 200 reconstruction steps per linear or block). Usage: bash benchmarks/recon_table.sh [OUT_DIR [CELL ...]]
# CELL = METHOD-FORMAT, e.g. brecq-w3 (default: every cell; folders that exist are kept).
set -euo pipefail
OUT=${1:-runs/recon}
shift || true
LB=${LB:-.venv/bin/lowbit}
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for f in w2g64 w3 w4a4 w2a4; do for m in rtn gptq adaround brecq qdrop; do CELLS+=("$m-$f"); done; done
fi
for cell in "${CELLS[@]}"; do
  m=${cell%-*}; f=${cell##*-}
  step=$m; [ "$m" = gptq ] && step="{gptq: {damp: 0.01, act_order: false, observer: minmax, diag_damp: 0}}"  # the defaults when measured
  [ -d "$OUT/$cell" ] || "$LB" run "recipes/recon-$f.yaml" --set "steps.0=$step" --set name="$cell" --out "$OUT/$cell" --quiet
done
"$LB" report "$OUT"/*
${PY:-.venv/bin/python} benchmarks/pivot.py "$OUT"/*

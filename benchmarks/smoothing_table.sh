#!/usr/bin/env bash
# Smoothing / outlier-suppression table of docs/results.md (issue 4): RTN, SmoothQuant, OS, OS+ at W8A8, W6A6,
# W4A8, W4A4 with dynamic per-token activations and W8A8, W6A6 with static per-tensor ones
# (recipes/wa-dynamic.yaml, recipes/wa-static.yaml: 8 x 512 calibration, 8192 test tokens).
# Usage: bash benchmarks/smoothing_table.sh [OUT_DIR [CELL ...]]   CELL = KIND-wWaA-METHOD, e.g. dyn-w4a8-osplus
# (default: every cell; folders that exist are kept). Then: python benchmarks/pivot.py OUT_DIR/*
set -euo pipefail
OUT=${1:-runs/smooth}
shift || true
LB=${LB:-.venv/bin/lowbit}
declare -A STEPS=([rtn]='[rtn]' [smoothquant]='[smoothquant]' [os]='[os]'
                  [osplus]='[{osplus: {grid: 10, search_samples: 1}}]')
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for m in rtn smoothquant os osplus; do
    for wa in w8a8 w6a6 w4a8 w4a4; do CELLS+=("dyn-$wa-$m"); done
    for wa in w8a8 w6a6; do CELLS+=("sta-$wa-$m"); done
  done
fi
for cell in "${CELLS[@]}"; do
  IFS=- read -r kind wa m <<< "$cell"
  w=${wa:1:1}; a=${wa:3:1}
  recipe=recipes/wa-dynamic.yaml; steps=${STEPS[$m]}
  if [ "$kind" = sta ]; then
    recipe=recipes/wa-static.yaml
    [ "$m" = os ] && steps='[{os: {search_samples: 1, fine_steps: 4}}]'
  fi
  [ -d "$OUT/$cell" ] || "$LB" run "$recipe" --set weights.bits=$w --set activations.bits=$a --set "steps=$steps" \
    --set name="$m" --out "$OUT/$cell" --quiet
done
${PY:-.venv/bin/python} benchmarks/pivot.py "$OUT"/*

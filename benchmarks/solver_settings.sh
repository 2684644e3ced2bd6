#!/usr/bin/env bash
# Solver settings against overfitting (docs/results.md, "Quality outside the calibration text"): GPTQ in group order
# at damp 0.05 (gptq-grouporder) varied one setting at a time (damping, column order, MSE ranges), and LWC with
# fewer epochs (the 5-epoch run is generalization_table.sh's lwc-w4g64); W4 g64 asymmetric, the recipes' 16 x 512
# WikiText-2 calibration windows, scored on WikiText-2 test and LAMBADA passages (8192 tokens each).
# Usage: bash benchmarks/solver_settings.sh [OUT_DIR [CELL ...]]   (default: every cell below; folders that exist
# are kept; about 3 minutes a GPTQ cell and 8 a LWC cell on one core)
set -euo pipefail
OUT=${1:-runs/solver}
shift || true
LB=${LB:-.venv/bin/lowbit}
args() {  # CELL -> the recipe and its overrides
  case $1 in
    gptq-damp0.01) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={damp: 0.01, act_order: group}" ;;
    gptq-damp0.1) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={damp: 0.1, act_order: group}" ;;
    gptq-damp0.2) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={damp: 0.2, act_order: group}" ;;
    gptq-grouporder) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={act_order: group}" ;;
    gptq-nonorder) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={act_order: false}" ;;
    gptq-fullorder) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={act_order: true}" ;;
    gptq-mse) printf "%q " recipes/wo-gptq.yaml --set "steps.0.gptq={act_order: group}" --set weights.observer=mse ;;
    lwc-epochs2) printf "%q " recipes/wo-lwc.yaml --set steps.0.lwc.epochs=2 ;;
    *) echo "unknown cell $1" >&2; exit 2 ;;
  esac
}
CELLS=("$@")
[ ${#CELLS[@]} -gt 0 ] || CELLS=(gptq-grouporder gptq-damp0.01 gptq-damp0.1 gptq-damp0.2 gptq-nonorder gptq-fullorder gptq-mse lwc-epochs2)
mkdir -p "$OUT"
for cell in "${CELLS[@]}"; do
  a=$(args "$cell")
  [ -d "$OUT/$cell-w4g64" ] || eval "\"$LB\" run $a --set name=$cell-w4g64 --out \"$OUT/$cell-w4g64\" --quiet"
done
"$LB" report "$OUT"/*

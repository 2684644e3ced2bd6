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
declare -A SET=(  # each cell's override of its recipe (wo-gptq for gptq-*, wo-lwc for lwc-*)
  [gptq-grouporder]="steps.0.gptq={act_order: group, diag_damp: 0}"
  [gptq-damp0.01]="steps.0.gptq={damp: 0.01, act_order: group, diag_damp: 0}"
  [gptq-damp0.1]="steps.0.gptq={damp: 0.1, act_order: group, diag_damp: 0}"
  [gptq-damp0.2]="steps.0.gptq={damp: 0.2, act_order: group, diag_damp: 0}"
  [gptq-nonorder]="steps.0.gptq={act_order: false, diag_damp: 0}"
  [gptq-fullorder]="steps.0.gptq={act_order: true, diag_damp: 0}"
  [gptq-mse]="steps.0.gptq={act_order: group, diag_damp: 0}"
  [lwc-epochs2]="steps.0.lwc.epochs=2")
declare -A OBSERVER=([gptq-mse]=mse)
CELLS=("$@")
[ ${#CELLS[@]} -gt 0 ] || CELLS=(gptq-grouporder gptq-damp0.01 gptq-damp0.1 gptq-damp0.2 gptq-nonorder gptq-fullorder
                                 gptq-mse lwc-epochs2)
mkdir -p "$OUT"
for cell in "${CELLS[@]}"; do
  [ -n "${SET[$cell]:-}" ] || { echo "unknown cell $cell" >&2; exit 2; }
  GPTQ_OBSERVER=()  # GPTQ's ranges as the weights' observer says (its own default is mse now)
  [[ $cell == gptq-* ]] && GPTQ_OBSERVER=(--set "steps.0.gptq.observer=${OBSERVER[$cell]:-minmax}")
  [ -d "$OUT/$cell-w4g64" ] || "$LB" run "recipes/wo-${cell%%-*}.yaml" --set "${SET[$cell]}" \
    --set weights.observer="${OBSERVER[$cell]:-minmax}" "${GPTQ_OBSERVER[@]}" --set name="$cell-w4g64" --out "$OUT/$cell-w4g64" \
    --quiet
done
"$LB" report "$OUT"/*

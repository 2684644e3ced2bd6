#!/usr/bin/env bash
# Calibration data study of docs/results.md: the best recipe at equal size (recipes/wo-rotate-gptq-equal.yaml:
# rotation + GPTQ group order + mse, head and embedding 8-bit) and GPTQ (group order, damp 0.05; min-max ranges),
# W4 g64 asymmetric, calibrated on each source (WikiText-2 validation, LAMBADA passages, their half/half mix, text
# the model writes itself, and WikiText-2 half and half with self-written text) with 16, 64 and 256 windows of
# 512 tokens; scored on WikiText-2 test and LAMBADA test, 8192 tokens each (2048-token windows).
# Usage: bash benchmarks/calibration_study.sh [OUT_DIR [CELL ...]]   CELL = METHOD-SOURCE-WINDOWS, e.g. gptq-mix-64
# (default: all 30 cells; folders that exist are kept). Cells with more windows take longer (256 windows: several
# times a 16-window cell); the self cells first sample the model's own text, 512 tokens at a time for 8 sequences
# per chunk, cached in $LOWBIT_CACHE/selfgen and shared by both methods and every window count (the 256-window cells
# sample the 24 chunks the others have not). Run the 16- and 64-window cells first: CELLS as arguments.
set -euo pipefail
OUT=${1:-runs/calibration}
shift || true
LB=${LB:-.venv/bin/lowbit}
declare -A RECIPE=([best]=wo-rotate-gptq-equal [gptq]=wo-gptq)
declare -A EXTRA=([best]="" [gptq]="steps.0.gptq={act_order: group, observer: minmax, diag_damp: 0}")  # gptq: group order, damp 0.05
declare -A SOURCE=([wikitext2]=wikitext2 [lambada]=lambada [mix]="[{wikitext2: 0.5}, {lambada: 0.5}]" [self]=self
                   [wself]="[{wikitext2: 0.5}, {self: 0.5}]")
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for n in 16 64 256; do for m in best gptq; do for s in wikitext2 lambada mix self wself; do
    CELLS+=("$m-$s-$n")
  done; done; done
fi
mkdir -p "$OUT"
for cell in "${CELLS[@]}"; do
  IFS=- read -r m s n <<< "$cell"
  extra=(); [ -n "${EXTRA[$m]}" ] && extra=(--set "${EXTRA[$m]}")
  [ -d "$OUT/$cell" ] || "$LB" run "recipes/${RECIPE[$m]}.yaml" --set "calibration.data=${SOURCE[$s]}" "${extra[@]}" \
    --set calibration.n_samples="$n" --set name="$cell" --out "$OUT/$cell" --quiet
done
"$LB" report "$OUT"/*

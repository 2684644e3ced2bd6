#!/usr/bin/env bash
# Weight-only table of docs/results.md (issue 3): RTN, GPTQ, GPTQ act-order + mse, AWQ, AWQ+GPTQ, LWC at
# W4 g64, W4 per-channel, W3 g64, W3 per-channel, W2 g64 (asymmetric; 16 x 512 calibration, 8192 test tokens).
# Usage: bash benchmarks/weight_only_table.sh [OUT_DIR [CELL ...]]   CELL = METHOD-FORMAT, e.g. gptq-w3ch
# (default: every cell; folders that exist are kept). About 3-8 minutes a cell on one core.
set -euo pipefail
OUT=${1:-runs/wo}
shift || true
LB=${LB:-.venv/bin/lowbit}
declare -A RECIPE=([rtn]=wo-rtn [gptq]=wo-gptq [gptq-ao-mse]=wo-gptq-ao-mse [awq]=wo-awq [awq-gptq]=wo-awq-gptq
                   [lwc]=wo-lwc)
declare -A FORMAT=([w4g64]="--set weights.bits=4" [w3g64]="--set weights.bits=3" [w2g64]="--set weights.bits=2"
                   [w4ch]="--set weights.bits=4 --set weights.granularity=channel --set weights.group_size=null"
                   [w3ch]="--set weights.bits=3 --set weights.granularity=channel --set weights.group_size=null")
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for f in w4g64 w4ch w3g64 w3ch w2g64; do for m in rtn gptq gptq-ao-mse awq awq-gptq lwc; do CELLS+=("$m-$f"); done; done
fi
for cell in "${CELLS[@]}"; do
  m=${cell%-*}; f=${cell##*-}
  [ -d "$OUT/$cell" ] || "$LB" run "recipes/${RECIPE[$m]}.yaml" ${FORMAT[$f]} --set name="$cell" --out "$OUT/$cell" --quiet
done
"$LB" report "$OUT"/*
${PY:-.venv/bin/python} benchmarks/pivot.py "$OUT"/*

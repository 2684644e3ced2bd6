#!/usr/bin/env bash
# In-domain and out-of-domain table of docs/results.md ("Quality outside the calibration text"): RTN, GPTQ, GPTQ
# act-order + mse, AWQ, LWC, the best recipe (rotation + GPTQ, head 16-bit) and the best recipe at equal size
# (head and embedding 8-bit), at W4 g64 and W3 g64, and the best recipe at equal size with 8-bit down projections
# and self-written calibration text (best-mixed, W4 g64 only), asymmetric; GPTQ with its step defaults
# (gptq-default); RTN, GPTQ and GPTQ defaults symmetric at W4 g64 (the GPTQModel comparison); every other run
# calibrated on WikiText-2 validation (the recipes' 16 x 512 windows; N=64 for 64) and scored on WikiText-2 test
# and LAMBADA passages (8192 tokens each, 2048-token windows). Peers when their venvs exist ($VENVS, default
# ~/.cache/lowbit-peers): HQQ 4-bit asym (no calibration) and GPTQModel's defaults (sym), same windows and texts.
# Usage: bash benchmarks/generalization_table.sh [OUT_DIR [CELL ...]]   CELL = METHOD-FORMAT, e.g. gptq-w3g64
# (default: every cell; folders that exist are kept). About 3-8 minutes a cell on one core, 19 cells.
set -euo pipefail
OUT=${1:-runs/generalization}
shift || true
LB=${LB:-.venv/bin/lowbit}
PY=${PY:-.venv/bin/python}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
N=${N:-16}
declare -A RECIPE=([rtn]=wo-rtn [gptq]=wo-gptq [gptq-ao-mse]=wo-gptq-ao-mse [awq]=wo-awq [lwc]=wo-lwc
                   [best]=wo-rotate-gptq [best-equal]=wo-rotate-gptq-equal [best-mixed]=wo-rotate-gptq-mixed
                   [gptq-default]=wo-gptq [rtn-sym]=wo-rtn [gptq-sym]=wo-gptq [gptq-default-sym]=wo-gptq)
declare -A FORMAT=([w4g64]="--set weights.bits=4" [w3g64]="--set weights.bits=3")
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for f in w4g64 w3g64; do for m in rtn gptq gptq-default gptq-ao-mse awq lwc best best-equal; do
    CELLS+=("$m-$f")
  done; done
  CELLS+=(best-mixed-w4g64 rtn-sym-w4g64 gptq-sym-w4g64 gptq-default-sym-w4g64)
fi
mkdir -p "$OUT"
for cell in "${CELLS[@]}"; do
  m=${cell%-*}; f=${cell##*-}
  extra=(); [[ $m == *-sym ]] && extra=(--set weights.symmetric=true)
  [[ $m == gptq-default* ]] && extra+=(--set "steps.0.gptq={}")  # the step's own defaults
  [ -d "$OUT/$cell" ] || "$LB" run "recipes/${RECIPE[$m]}.yaml" ${FORMAT[$f]} "${extra[@]}" \
    --set calibration.n_samples="$N" --set name="$cell" --out "$OUT/$cell" --quiet
done
runs=("${CELLS[@]/#/$OUT/}")
if [ -x "$VENVS/hqq/bin/python" ] || [ -x "$VENVS/gptqmodel/bin/python" ]; then
  MODEL=$("$PY" -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())")
  recipe="$OUT/recipe-peer.yaml"  # the RTN recipe with this table's calibration count
  sed "s/n_samples: 16/n_samples: $N/" recipes/wo-rtn.yaml > "$recipe"
  [ -f "$OUT/calib.pt" ] || "$PY" benchmarks/peers/to_run.py windows "$recipe" "$OUT/calib.pt"
  if [ -x "$VENVS/hqq/bin/python" ] && [ ! -d "$OUT/peer-hqq-w4g64" ]; then
    [ -d "$OUT/hqq" ] || "$VENVS/hqq/bin/python" benchmarks/peers/hqq_run.py "$MODEL" "$OUT/hqq"
    "$PY" benchmarks/peers/to_run.py import "$recipe" "$OUT/hqq" "$OUT/peer-hqq-w4g64"
  fi
  if [ -x "$VENVS/gptqmodel/bin/python" ] && [ ! -d "$OUT/peer-gptqmodel-sym-w4g64" ]; then
    sed "s/symmetric: false/symmetric: true/" "$recipe" > "$OUT/recipe-peer-sym.yaml"
    [ -d "$OUT/gptqmodel" ] || GPTQMODEL_CPU_WORKERS=2 "$VENVS/gptqmodel/bin/python" benchmarks/peers/gptqmodel_run.py \
      "$MODEL" "$OUT/calib.pt" "$OUT/gptqmodel" --sym
    "$PY" benchmarks/peers/to_run.py import "$OUT/recipe-peer-sym.yaml" "$OUT/gptqmodel" "$OUT/peer-gptqmodel-sym-w4g64"
  fi
  runs+=("$OUT"/peer-*)
fi
"$LB" report "${runs[@]}"

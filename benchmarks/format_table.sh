#!/usr/bin/env bash
# Format table of docs/results.md (issue 18): W4 int4 g32 / g64 (asymmetric), MXFP4, NVFP4, FP4 e2m1 g32 with
# 16-bit scales, and FP8 2-D blocks with per-token-group FP8 activations (W8A8), each with RTN (min-max) and with
# GPTQ act-order + mse (16 x 512 calibration, TOKENS test tokens, default 4096); every format compressed-tensors has is exported
# and the reloaded model scored on the same windows of WikiText-2 and LAMBADA by `lowbit verify`
# (RUN/verify-TEXT.json).
# Usage: bash benchmarks/format_table.sh [OUT_DIR [CELL ...]]   CELL = SOLVER-FORMAT, e.g. gptq-nvfp4
set -euo pipefail
OUT=${1:-runs/formats}
shift || true
LB=${LB:-.venv/bin/lowbit}
TOKENS=${TOKENS:-4096}
declare -A RECIPE=([rtn]=wo-rtn [gptq]=wo-gptq-ao-mse)
declare -A SOLVER=([rtn]="--set threads=2 --set evaluation.max_tokens=$TOKENS"
                   [gptq]="--set threads=2 --set evaluation.max_tokens=$TOKENS --set steps.0.gptq.true_sequential=false")
declare -A FORMAT=(
  [int4g64]="{bits: 4, symmetric: false, group_size: 64}"
  [int4g32]="{bits: 4, symmetric: false, group_size: 32}"
  [mxfp4]="{format: mxfp4}"
  [nvfp4]="{format: nvfp4}"
  [fp4g32]="{format: fp, bits: 4, group_size: 32}"
  [fp8block]="{format: fp, bits: 8, block: [128, 64]}")
FP8_ACTS="activations={format: fp, bits: 8, group_size: 64, dynamic: true}"
CELLS=("$@")
if [ ${#CELLS[@]} -eq 0 ]; then
  for s in rtn gptq; do for f in int4g64 int4g32 mxfp4 nvfp4 fp4g32 fp8block; do CELLS+=("$s-$f"); done; done
fi
for cell in "${CELLS[@]}"; do
  s=${cell%%-*}; f=${cell#*-}
  observer=$([ "$s" = gptq ] && echo mse || echo minmax)
  weights="${FORMAT[$f]%\}}, observer: $observer}"
  acts=()
  [ "$f" = fp8block ] && acts=(--set "$FP8_ACTS")
  [ -d "$OUT/$cell" ] || $LB run "recipes/${RECIPE[$s]}.yaml" ${SOLVER[$s]} --set "weights=$weights" "${acts[@]}" \
    --set name="$cell" --out "$OUT/$cell" --quiet
  [ "$f" = fp4g32 ] && continue  # plain FP4 groups with 16-bit scales: no compressed-tensors format
  [ -d "$OUT/$cell/compressed-tensors" ] || $LB export "$OUT/$cell" --format compressed-tensors
  for text in wikitext2 lambada; do
    result="$OUT/$cell/verify-$text.json"
    [ -f "$result" ] || { $LB verify "$OUT/$cell" "$OUT/$cell/compressed-tensors" --data $text --max-tokens $TOKENS \
      --threads 2 --quiet > "$result.tmp" && mv "$result.tmp" "$result"; }
  done
done
$LB report "$OUT"/*

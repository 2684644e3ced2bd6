#!/usr/bin/env bash
# Weight-activation table of docs/results.md, "rotation and channel reassembly" section: FP, RTN, rotation,
# rotation+GPTQ and QLLM at W8A8, W6A6, W4A8, W4A4 (per-channel symmetric weights, per-token dynamic
# asymmetric activations, 16 x 512 calibration tokens, 8192 WikiText-2 test tokens; rotation+GPTQ with act-order,
# mse weight ranges and, at 4-bit activations, clip ratio 0.8).
# Usage: bash benchmarks/rotation_table.sh [OUT_DIR]   (each run is 5-25 minutes on a busy 2-core machine)
set -euo pipefail
OUT=${1:-runs}
LB=${LB:-.venv/bin/lowbit}
for method in rtn rotate rotate-gptq qllm; do
  for wa in "8 8" "6 6" "4 8" "4 4"; do
    set -- $wa
    clip=1.0; [ "$method" = rotate-gptq ] && [ "$2" = 4 ] && clip=0.8  # the recipe clips 4-bit activations only
    [ -d "$OUT/wa-$method-w$1a$2" ] || "$LB" run "recipes/wa-$method.yaml" --set weights.bits=$1 \
      --set activations.bits=$2 --set activations.clip_ratio=$clip --out "$OUT/wa-$method-w$1a$2" --quiet
  done
done
"$LB" report "$OUT"/wa-*-w*a*

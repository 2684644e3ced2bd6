#!/usr/bin/env bash
# Mixed-precision section of docs/results.md: sensitivity of the embedded model (GPTQ act-order + mse, the
# candidates w2g64 w3g64 w4g64 w8, hessian and fisher metrics), uniform W2/W3/W4 g64 and budgeted mixed precision
# with the same solver (16 x 512 calibration, 8192 test tokens per text, 2 threads), then the ground-truth loss
# metric for the rank correlation. Each command runs under the machine's benchmark lock when LOCK is set.
# Usage: bash benchmarks/mixed_table.sh [OUT_DIR]   (folders that exist are kept)
#        then: python benchmarks/mixed_plot.py docs/mixed_ppl_size.png OUT_DIR/uniform-* OUT_DIR/hessian-* OUT_DIR/fisher-*
set -euo pipefail
OUT=${1:-runs/mixed}
LB=${LB:-.venv/bin/lowbit}
LOCK=${LOCK-}  # a lock file to serialise benchmark runs on a shared machine (empty: none)
R=recipes/wo-gptq-ao-mse.yaml
run() { [ -e "$1" ] || ${LOCK:+flock "$LOCK"} "${@:2}"; }
run "$OUT/sens-fisher" "$LB" sensitivity $R --set threads=2 --metric fisher --heldout 2 --out "$OUT/sens-fisher" --quiet
uniform() { run "$OUT/uniform-w${1}g64" "$LB" run $R --set threads=2 --set weights.bits=$1 --set name=uniform-w${1}g64 \
                --out "$OUT/uniform-w${1}g64" --quiet; }
mixed() {  # METRIC AVG_BITS
  run "$OUT/$1-$2" "$LB" run $R --set threads=2 --set name=$1-$2 --budget avg_bits=$2 --budget metric=$1 \
      --budget sensitivity="$OUT/sens-fisher/sensitivity.json" --out "$OUT/$1-$2" --quiet; }
uniform 3
uniform 4
# avg bits per quantized weight: halfway between uniform W3 g64 (3 + 19/64) and W4 g64 (4 + 20/64), then W3's
mixed fisher 3.8046875
mixed hessian 3.8046875
mixed fisher 3.296875
# ground truth for the rank correlation: loss increase of every linear alone in W3 g64 (one eval each), on one
# held-out window of 256 tokens (calibration windows of 256 tokens too, to keep the 240 evaluations affordable)
run "$OUT/sens-loss-w3g64" "$LB" sensitivity $R --set threads=2 --set calibration.seq_len=256 --formats w3g64 \
    --metric all --heldout 1 --out "$OUT/sens-loss-w3g64" --quiet
mixed fisher 3.55
uniform 2
mixed fisher 2.79
"$LB" report "$OUT"/uniform-* "$OUT"/hessian-* "$OUT"/fisher-*

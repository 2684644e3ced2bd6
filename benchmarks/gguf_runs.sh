#!/usr/bin/env bash
# GGUF table: the embedded model quantized onto GGUF types by RTN and by GPTQ (act-order + mse), exported with
# `lowbit export --format gguf`, scored in llama.cpp on WikiText-2 and LAMBADA (benchmarks/gguf_score.py; Q4_K
# first, for the bar). Decode speeds are a separate sitting with nothing else running:
# python benchmarks/gguf_score.py OUT --speed
# Usage: benchmarks/gguf_runs.sh [OUT=runs/gguf]
set -euo pipefail
OUT=${1:-runs/gguf}
PY=${PY:-python}
run_one() {  # solver type
  local run="$OUT/$1-$2"
  [ -f "$run/quant_state.json" ] || $PY -m lowbit run "recipes/gguf-$1.yaml" --set weights.type=$2 --set evaluation=null \
    --out "$run" --quiet
  [ -f "$run/gguf.gguf" ] || $PY -m lowbit export "$run" --format gguf
}
run_one rtn q4_k
run_one gptq q4_k
$PY benchmarks/gguf_score.py "$OUT" f16 q4_k
for pair in rtn:q4_k_m gptq:q4_k_m rtn:q4_0 gptq:q4_0 rtn:q6_k rtn:q8_0 gptq:q6_k gptq:q8_0; do
  run_one "${pair%%:*}" "${pair##*:}"
  $PY benchmarks/gguf_score.py "$OUT" "${pair##*:}"
done
$PY benchmarks/gguf_score.py "$OUT" --table

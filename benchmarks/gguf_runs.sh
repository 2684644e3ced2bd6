#!/usr/bin/env bash
# GGUF table, part 1: the embedded model quantized onto each GGUF type by RTN and by GPTQ (act-order + mse),
# each run under the machine-wide bench lock, then exported with `lowbit export --format gguf`.
# Usage: benchmarks/gguf_runs.sh [OUT=/work/runs/gguf]
set -euo pipefail
OUT=${1:-/work/runs/gguf}
LOWBIT=${LOWBIT:-"python -m lowbit"}
LOCK=${LOCK:-/work/board/bench.lock}
for type in q4_k q4_0 q6_k q8_0 q4_k_m; do
  for solver in rtn gptq; do
    run="$OUT/$solver-$type"
    [ -f "$run/metrics.json" ] || flock "$LOCK" $LOWBIT run "recipes/gguf-$solver.yaml" --set weights.type=$type --out "$run" --quiet
    [ -f "$run/gguf.gguf" ] || $LOWBIT export "$run" --format gguf
  done
done

#!/usr/bin/env bash
# Export table of docs/results.md (issue 6, "Export: deployed equals simulated"): five RTN runs of the embedded
# model, each exported and compared with its simulated model by `lowbit verify` on the same 4 x 2048 tokens of
# WikiText-2 test and of LAMBADA (out of domain), one thread.
# Usage: bash benchmarks/export_table.sh [OUT_DIR]   (folders and files that exist are kept), then
#        python benchmarks/export_pivot.py OUT_DIR
set -euo pipefail
OUT=${1:-runs/export}
LB=${LB:-.venv/bin/lowbit}
mkdir -p "$OUT"
run() {  # NAME RECIPE [--set ...]
  local name=$1 recipe=$2; shift 2
  [ -d "$OUT/$name" ] || "$LB" run "$recipe" "$@" --out "$OUT/$name" --quiet
}
run export-w4g32-sym recipes/export-w4g32-sym.yaml
run export-w8-channel recipes/export-w8-channel.yaml
run export-w8a8 recipes/export-w8a8.yaml
run export-fp8 recipes/export-fp8.yaml
run export-w4g64-asym recipes/rtn-w4g64.yaml --set threads=1 --set evaluation.max_tokens=8192 \
  --set calibration.n_samples=4
for row in export-w4g32-sym:compressed-tensors export-w8a8:compressed-tensors export-fp8:compressed-tensors \
           export-w4g32-sym:gguf-q4_0 export-w4g64-asym:gguf-q4_0 export-w8-channel:gguf-q8_0; do
  name=${row%%:*}; format=${row##*:}
  case $format in gguf-*) path="$OUT/$name/$format.gguf" ;; *) path="$OUT/$name/$format" ;; esac
  [ -e "$path" ] || "$LB" export "$OUT/$name" --format "$format" > "$OUT/export-$name-$format.log" 2>&1
  for text in wikitext2 lambada; do
    result="$OUT/verify-$name-$format-$text.json"
    [ -f "$result" ] || { "$LB" verify "$OUT/$name" "$path" --data "$text" --max-tokens 8192 --threads 1 --quiet \
      --min-top1 0 --max-ppl-diff 1e9 > "$result.tmp" && mv "$result.tmp" "$result"; }
  done
done
${PY:-.venv/bin/python} "$(dirname "$0")/export_pivot.py" "$OUT"

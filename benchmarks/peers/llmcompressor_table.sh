#!/usr/bin/env bash
# llm-compressor's SparseGPT and Wanda on the embedded model, with lowbit's 64 x 512 calibration windows, scored
# by `lowbit eval` on the same first $TOKENS (default 8192) WikiText-2 test tokens as the lowbit rows (docs/results.md,
# "Sparsity"). Usage: bash benchmarks/peers/llmcompressor_table.sh OUT_DIR [METHOD:SPARSITY:N:M ...]
# On a shared machine run it under the bench lock: flock LOCK bash benchmarks/peers/llmcompressor_table.sh OUT
set -euo pipefail
OUT=$1; shift
JOBS=${*:-sparsegpt:0.5:0:0 wanda:0.5:0:0 sparsegpt:0.5:2:4 wanda:0.5:2:4}
TOKENS=${TOKENS:-8192}
PEER=${PEER:-${VENVS:-$HOME/.cache/lowbit-peers}/llmcompressor/bin/python}
PY=${PY:-.venv/bin/python}   # lowbit's venv
LB=("$PY" -m lowbit)
HERE=$(dirname "$0")
mkdir -p "$OUT"
[ -f "$OUT/calib.pt" ] || "$PY" "$HERE/llmcompressor_sparsity.py" windows "$OUT/calib.pt"
MODEL=$("$PY" -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())")
for job in $JOBS; do
  IFS=: read -r method sparsity n m <<< "$job"
  name=llmc-$method-$("$PY" -c "print(round($sparsity * 100))")-$n$m
  [ -f "$OUT/$name/eval.json" ] && continue
  "$PEER" "$HERE/llmcompressor_sparsity.py" prune "$MODEL" "$OUT/calib.pt" --method "$method" \
    --sparsity "$sparsity" --mask "$n:$m" --out "$OUT/$name" --threads 2
  "${LB[@]}" eval "$OUT/$name" --threads 2 --quiet --max-tokens "$TOKENS" > "$OUT/$name/eval.json"
done

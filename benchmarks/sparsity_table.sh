#!/usr/bin/env bash
# Post-training sparsity on the embedded model (docs/results.md, "Sparsity"), most informative rows first.
# Usage: bash benchmarks/sparsity_table.sh OUT_DIR GROUP...   GROUP: first second more grid (= grid-owl grid-learned)
# On a shared machine run each group under the bench lock: flock LOCK bash benchmarks/sparsity_table.sh OUT first
# Evaluation on the first $TOKENS (default 8192) WikiText-2 test tokens; 64 x 512 calibration tokens; 2 threads.
set -euo pipefail
OUT=$1; shift
GROUPS_=$*
TOKENS=${TOKENS:-8192}
LB=(${LB:-.venv/bin/lowbit})
R=recipes/sparse-wanda-50.yaml
run() {
  local name=$1; shift
  [ -d "$OUT/$name" ] && return 0
  "${LB[@]}" run "$R" --quiet --out "$OUT/$name" --set name=$name --set evaluation.max_tokens=$TOKENS "$@" \
    || echo "run $name failed" >&2
}
W4=(--set "weights={bits: 4, symmetric: false, group_size: 64}")
for g in $GROUPS_; do case $g in
first)
  run wanda-50 --set "steps=[{wanda: {ratio: 0.5}}]"
  run sparsegpt-50 --set "steps=[{sparsegpt: {ratio: 0.5}}]"
  run wanda-2of4 --set "steps=[{wanda: {pattern: '2:4'}}]"
  run sparsegpt-2of4 --set "steps=[{sparsegpt: {pattern: '2:4'}}]"
  run wanda-70 --set "steps=[{wanda: {ratio: 0.7}}]"
  run learned-wanda-70 --set "steps=[{learned: {target: 0.7}}, wanda]" ;;
second)
  run sparsegpt-50-gptq-w4 "${W4[@]}" --set "steps=[{sparsegpt: {ratio: 0.5}}, {gptq: {damp: 0.01, act_order: false, observer: minmax, diag_damp: 0}}]"
  run sparsegpt-2of4-gptq-w4 "${W4[@]}" --set "steps=[{sparsegpt: {pattern: '2:4'}}, {gptq: {act_order: group, observer: minmax, diag_damp: 0}}]"
  run owl-wanda-70 --set "steps=[{owl: {target: 0.7}}, wanda]"
  run sparsegpt-70 --set "steps=[{sparsegpt: {ratio: 0.7}}]"
  run learned-sparsegpt-70 --set "steps=[{learned: {target: 0.7}}, sparsegpt]"
  run magnitude-50 --set "steps=[{magnitude: {ratio: 0.5}}]"
  run magnitude-2of4 --set "steps=[{magnitude: {pattern: '2:4'}}]"
  run owl-sparsegpt-70 --set "steps=[{owl: {target: 0.7}}, sparsegpt]" ;;
more)
  for r in 60 80; do
    run wanda-$r --set "steps=[{wanda: {ratio: 0.$r}}]"
    run sparsegpt-$r --set "steps=[{sparsegpt: {ratio: 0.$r}}]"
    run magnitude-$r --set "steps=[{magnitude: {ratio: 0.$r}}]"
  done
  run magnitude-70 --set "steps=[{magnitude: {ratio: 0.7}}]"
  run wanda-4of8 --set "steps=[{wanda: {pattern: '4:8'}}]"
  run sparsegpt-4of8 --set "steps=[{sparsegpt: {pattern: '4:8'}}]"
  run magnitude-4of8 --set "steps=[{magnitude: {pattern: '4:8'}}]"
  run shortgpt-25 --set "steps=[{shortgpt: {target: 0.25}}]"
  run owl-magnitude-70 --set "steps=[{owl: {target: 0.7}}, magnitude]"
  run learned-magnitude-70 --set "steps=[{learned: {target: 0.7}}, magnitude]" ;;
grid|grid-owl)  # the rest of the allocation grid: OWL and learned allocation at 50, 60 and 80% per pruning step
  for r in 50 60 80; do for m in wanda sparsegpt magnitude; do
    run owl-$m-$r --set "steps=[{owl: {target: 0.$r}}, $m]"
  done; done ;;&
grid|grid-learned)
  for r in 50 60 80; do for m in wanda sparsegpt magnitude; do
    run learned-$m-$r --set "steps=[{learned: {target: 0.$r}}, $m]"
  done; done ;;
esac; done
"${LB[@]}" report "$OUT"/*/ > "$OUT/table.md"

#!/usr/bin/env bash
# Post-training sparsity on the embedded model (docs/results.md, "Sparsity" section), most informative rows first.
# Usage: bash benchmarks/sparsity_table.sh [OUT_DIR] [GROUP...]   GROUP: core alloc joint more (default: all)
# Each run takes the machine-wide bench lock when LOCK is set (LOCK=/path/to/lock); 2 threads.
set -euo pipefail
OUT=${1:-runs/sparsity}; shift || true
GROUPS_=${*:-core alloc joint more}
LB=(${LB:-.venv/bin/lowbit})
R=recipes/sparse-wanda-50.yaml
run() {
  local name=$1; shift
  [ -d "$OUT/$name" ] && return 0
  if [ -n "${LOCK:-}" ]; then flock "$LOCK" "${LB[@]}" run "$R" --quiet --out "$OUT/$name" --set name=$name "$@"
  else "${LB[@]}" run "$R" --quiet --out "$OUT/$name" --set name=$name "$@"; fi
}
W4=(--set "weights={bits: 4, symmetric: false, group_size: 64}")
for g in $GROUPS_; do case $g in
core)
  run wanda-50 --set "steps=[{wanda: {ratio: 0.5}}]"
  run sparsegpt-50 --set "steps=[{sparsegpt: {ratio: 0.5}}]"
  run wanda-2of4 --set "steps=[{wanda: {pattern: '2:4'}}]"
  run sparsegpt-2of4 --set "steps=[{sparsegpt: {pattern: '2:4'}}]"
  run magnitude-50 --set "steps=[{magnitude: {ratio: 0.5}}]"
  run magnitude-2of4 --set "steps=[{magnitude: {pattern: '2:4'}}]" ;;
alloc)
  run wanda-70 --set "steps=[{wanda: {ratio: 0.7}}]"
  run learned-wanda-70 --set "steps=[{learned: {target: 0.7}}, wanda]"
  run owl-wanda-70 --set "steps=[{owl: {target: 0.7}}, wanda]"
  run sparsegpt-70 --set "steps=[{sparsegpt: {ratio: 0.7}}]"
  run learned-sparsegpt-70 --set "steps=[{learned: {target: 0.7}}, sparsegpt]"
  run owl-sparsegpt-70 --set "steps=[{owl: {target: 0.7}}, sparsegpt]" ;;
joint)
  run sparsegpt-50-gptq-w4 "${W4[@]}" --set "steps=[{sparsegpt: {ratio: 0.5}}, gptq]"
  run sparsegpt-2of4-gptq-w4 "${W4[@]}" --set "steps=[{sparsegpt: {pattern: '2:4'}}, gptq]" ;;
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
  run shortgpt-25 --set "steps=[{shortgpt: {target: 0.25}}]" ;;
esac; done
"${LB[@]}" report "$OUT"/*/

#!/usr/bin/env bash
# The comparison table of docs/results.md (issue 16): lowbit and peer toolkits on the embedded model in one sitting,
# W4 g64 asymmetric weight-only and W8A8 (int8 per-channel symmetric weights, int8 dynamic per-token activations).
# Every method calibrates on the same 64 x 512 WikiText-2 windows (`to_run.py windows`), perplexity is measured
# on the same WikiText-2 / LAMBADA tokens, tasks by `lowbit eval --limit LIMIT` on the offline copies.
# Phase 1 compresses every method (times and peak memory: run it with nothing else on the machine) and then
# measures the block diagnostics' cost (timed); phase 2 scores tasks (no times taken), then the table, figure and page.
# Usage: VENVS=/path/to/peer/venvs bash benchmarks/peer_table.sh OUT [LIMIT] [AUTOROUND_ITERS]
# AUTOROUND_ITERS 0 leaves AutoRound out. Re-running skips what OUT already holds.
set -euo pipefail
OUT=${1:?output folder}; LIMIT=${2:-100}; AR_ITERS=${3:-50}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
PY=${PY:-.venv/bin/python}
export GPTQMODEL_CPU_WORKERS=2  # GPTQModel on a 2-core machine
HERE=$(dirname "$0")
TASKS=lambada_openai,piqa,winogrande,boolq,hellaswag_text
W4=recipes/wo-rtn.yaml; W8A8=recipes/wa-dynamic.yaml
SETS=(--set calibration.n_samples=64 --set threads=2)
MODEL=$("$PY" -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())")
RUNS=$OUT/runs; PEERS=$OUT/peers
mkdir -p "$RUNS" "$PEERS"
lb() { "$PY" -m lowbit "$@"; }
ours() {  # NAME RECIPE [--set ...]: a lowbit run
  local name=$1 recipe=$2; shift 2
  [ -d "$RUNS/$name" ] || lb run "$recipe" "${SETS[@]}" "$@" --out "$RUNS/$name" --quiet
}
peer() {  # NAME RECIPE VENV SCRIPT ARGS...: a peer's run in its venv, imported as a lowbit run folder
  local name=$1 recipe=$2 venv=$3 script=$4; shift 4
  [ -d "$RUNS/$name" ] && return
  [ -f "$PEERS/$name/peer_metrics.json" ] || "$VENVS/$venv/bin/python" "$HERE/peers/$script" "$@"
  "$PY" "$HERE/peers/to_run.py" import "$recipe" "$PEERS/$name" "$RUNS/$name" "${SETS[@]}"
}
CAL=$OUT/calib-w4.pt; CAL8=$OUT/calib-w8a8.pt
[ -f "$CAL" ] || "$PY" "$HERE/peers/to_run.py" windows "$W4" "$CAL" "${SETS[@]}"
[ -f "$CAL8" ] || "$PY" "$HERE/peers/to_run.py" windows "$W8A8" "$CAL8" "${SETS[@]}"
cmp -s "$CAL" "$CAL8" || "$PY" -c "import torch,sys; a,b=(torch.load(p) for p in sys.argv[1:]); \
assert torch.equal(a,b), 'the two recipes calibrate on different windows'" "$CAL" "$CAL8"

# phase 1: compression, timed
[ -d "$RUNS/fp" ] || lb quantize --model smollm2-135m --wbits 16 --nsamples 64 --max-tokens 8192 --threads 2 \
  --name fp --out "$RUNS/fp" --quiet
ours w4-lowbit-rtn "$W4"
ours w4-lowbit-gptq recipes/wo-gptq.yaml
ours w4-lowbit-awq recipes/wo-awq.yaml
ours w4-lowbit-rotate-gptq recipes/wo-rotate-gptq.yaml
ours w4-lowbit-rotate-gptq-equal recipes/wo-rotate-gptq-equal.yaml
peer w4-llmc-gptq "$W4" llmcompressor llmcompressor_run.py "$MODEL" "$CAL" "$PEERS/w4-llmc-gptq" --method gptq
peer w4-llmc-awq "$W4" llmcompressor llmcompressor_run.py "$MODEL" "$CAL" "$PEERS/w4-llmc-awq" --method awq
peer w4-gptqmodel "$W4" gptqmodel gptqmodel_run.py "$MODEL" "$CAL" "$PEERS/w4-gptqmodel"
peer w4-hqq "$W4" hqq hqq_run.py "$MODEL" "$PEERS/w4-hqq" --threads 2
ours w8a8-lowbit-rtn "$W8A8"
ours w8a8-lowbit-sq-gptq "$W8A8" --set 'steps=[smoothquant, {gptq: {act_order: group, observer: minmax, diag_damp: 0}}]'  # the defaults it was measured with
peer w8a8-llmc-sq-gptq "$W8A8" llmcompressor llmcompressor_run.py "$MODEL" "$CAL8" "$PEERS/w8a8-llmc-sq-gptq" \
  --method sq-gptq --bits 8 --group-size 0 --sym --act-bits 8
[ "$AR_ITERS" = 0 ] || peer w4-autoround "$W4" autoround autoround_run.py "$MODEL" "$CAL" "$PEERS/w4-autoround" \
  --iters "$AR_ITERS"  # 0 skips AutoRound (on 2 cores: about 45 s per block at 50 iterations)
[ -f "$OUT/diag_cost.txt" ] || "$PY" "$HERE/diag_cost.py" 16 > "$OUT/diag_cost.txt"

# phase 2: task accuracy (not timed)
for run in "$RUNS"/*/; do
  grep -q '"tasks"' "$run/metrics.json" && continue
  lb eval "$run" --tasks "$TASKS" --limit "$LIMIT" --task-source local --threads 2 --quiet
done
lb report "$RUNS"/*/ --plot "$OUT/compare.png" --html "$OUT/compare.html" | tee "$OUT/table.md"

#!/bin/bash
# Resume after SIGKILL: GPTQ W4 g64 on the embedded model, killed once half the blocks are checkpointed,
# resumed with --resume; compares the saved weights byte for byte and the perplexity with an uninterrupted run.
# Usage (from the repository root): bash benchmarks/resume_check.sh OUT_DIR
set -eu
OUT=${1:?output folder}
PY=${PY:-python}
mkdir -p "$OUT"
rm -rf "$OUT/full" "$OUT/cut" "$OUT"/.cut.lowbit-partial.*
SET=(--set threads=2 --set calibration.n_samples=16 --set evaluation.max_tokens=8192 --set evaluation.baseline=false)
start=$(date +%s)
$PY -m lowbit run recipes/wo-gptq.yaml "${SET[@]}" --out "$OUT/full" --quiet > "$OUT/full.txt"
echo "uninterrupted: $(( $(date +%s) - start )) s"
$PY -m lowbit run recipes/wo-gptq.yaml "${SET[@]}" --out "$OUT/cut" --quiet > "$OUT/cut.txt" 2>&1 &
pid=$!
partial() { ls -d "$OUT"/.cut.lowbit-partial.* 2>/dev/null | head -1; }  # the run's staging folder
while [ -z "$(partial)" ] || [ ! -d "$(partial)/checkpoint/block-00015" ]; do
  kill -0 $pid 2>/dev/null || { echo "run ended before it could be killed"; exit 1; }
  sleep 0.2
done
kill -9 $pid; wait $pid 2>/dev/null || true
P=$(partial)
echo "killed with SIGKILL after: $(ls "$P/checkpoint" | grep block-)"
[ ! -e "$OUT/cut" ] && [ ! -e "$P/metrics.json" ] && echo "partial folder does not look finished: ok"
start=$(date +%s)
$PY -m lowbit run recipes/wo-gptq.yaml "${SET[@]}" --resume "$P" --quiet > "$OUT/resumed.txt"
echo "resume: $(( $(date +%s) - start )) s"
for f in model/model.safetensors quant_state.safetensors quant_state.json; do
  cmp "$OUT/full/$f" "$OUT/cut/$f" && echo "$f byte-identical"
done
$PY -c "import json,sys; a,b=(json.load(open(f'$OUT/{d}/metrics.json'))['ppl']['ppl'] for d in ('full','cut')); print(f'perplexity uninterrupted {a:.6f} resumed {b:.6f} equal: {a == b}')"

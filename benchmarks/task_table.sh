#!/usr/bin/env bash
# Task accuracy (lm-eval, offline task copies, --limit) for FP, RTN W4 g64 and the best W4 g64 recipe on the
# embedded model, plus the comparison figure. Usage: benchmarks/task_table.sh OUT_DIR [LIMIT]
set -euo pipefail
OUT=${1:?output folder}; LIMIT=${2:-200}
TASKS=lambada_openai,piqa,winogrande,boolq,hellaswag_text
lowbit() { python -m lowbit "$@"; }
mkdir -p "$OUT"
[ -d "$OUT/fp" ] || lowbit quantize --model smollm2-135m --wbits 16 --nsamples 16 --max-tokens 8192 --threads 2 \
  --name fp --out "$OUT/fp" --quiet
[ -d "$OUT/rtn-w4g64" ] || lowbit run recipes/wo-rtn.yaml --set threads=2 --out "$OUT/rtn-w4g64" --quiet
[ -d "$OUT/rotate-gptq-w4g64" ] || lowbit run recipes/wo-rotate-gptq.yaml --set threads=2 \
  --out "$OUT/rotate-gptq-w4g64" --quiet
for run in fp rtn-w4g64 rotate-gptq-w4g64; do
  /usr/bin/time -f "$run eval: %e s, max RSS %M kB" \
    python -m lowbit eval "$OUT/$run" --tasks "$TASKS" --limit "$LIMIT" --task-source local --threads 2 --quiet
done
lowbit report "$OUT/fp" "$OUT/rtn-w4g64" "$OUT/rotate-gptq-w4g64" --plot "$OUT/compare.png" --html "$OUT/compare.html"

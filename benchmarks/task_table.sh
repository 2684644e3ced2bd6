#!/usr/bin/env bash
# Task accuracy (lm-eval, offline task copies, --limit) for FP, RTN W4 g64 and the best W4 g64 recipe on the
# embedded model, the comparison figure, then the cost of the block diagnostics.
# Usage: benchmarks/task_table.sh OUT_DIR [LIMIT]   (run under the machine's bench lock)
set -euo pipefail
OUT=${1:?output folder}; LIMIT=${2:-200}
TASKS=lambada_openai,piqa,winogrande,boolq,hellaswag_text
lowbit() { python -m lowbit "$@"; }
evaluate() { /usr/bin/time -f "$1 eval: %e s, max RSS %M kB" \
  python -m lowbit eval "$OUT/$1" --tasks "$TASKS" --limit "$LIMIT" --task-source local --threads 2 --quiet; }
mkdir -p "$OUT"
[ -d "$OUT/fp" ] || lowbit quantize --model smollm2-135m --wbits 16 --nsamples 16 --max-tokens 8192 --threads 2 \
  --name fp --out "$OUT/fp" --quiet
evaluate fp
[ -d "$OUT/rtn-w4g64" ] || lowbit run recipes/wo-rtn.yaml --set threads=2 --out "$OUT/rtn-w4g64" --quiet
evaluate rtn-w4g64
[ -d "$OUT/rotate-gptq-w4g64" ] || lowbit run recipes/wo-rotate-gptq.yaml --set threads=2 \
  --out "$OUT/rotate-gptq-w4g64" --quiet
evaluate rotate-gptq-w4g64
lowbit report "$OUT/fp" "$OUT/rtn-w4g64" "$OUT/rotate-gptq-w4g64" --plot "$OUT/compare.png" --html "$OUT/compare.html"
python benchmarks/diag_cost.py 16

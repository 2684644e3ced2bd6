#!/usr/bin/env bash
# Real-kernels check table of docs/results.md ("Real low-bit kernels on the CPU"): three RTN runs of the embedded
# model (W8A16, W4A16 g64, W8A8), each packed onto PyTorch's CPU kernels and compared with its simulated model by
# `lowbit kernels RUN --check` on WikiText-2 and LAMBADA test: bfloat16 kernel inputs on 4096 tokens (512-token
# windows), float32 inputs on 256 tokens (128-token windows) for the weight-only runs, the noise floor for W8A8.
# Usage: bash benchmarks/kernels_table.sh [OUT_DIR]   (results: OUT/RUN/check-TEXT-DTYPE.json, then the table)
set -euo pipefail
OUT=${1:-runs/kernels}
LB=${LB:-.venv/bin/lowbit}
PY=${PY:-.venv/bin/python}
C="--nsamples 4 --calib-seq-len 128 --max-tokens 4096 --threads 1"
declare -A ARGS=([w8a16]="--wbits 8 --sym" [w4a16]="--wbits 4 --group-size 64" [w8a8]="--wbits 8 --sym --abits 8")
check() {  # run text dtype [extra args...]: the JSON part of `lowbit kernels --check`
  local result="$OUT/kernels-$1/check-$2-$3.json"
  [ -f "$result" ] || { $LB kernels "$OUT/kernels-$1" --check --data "$2" --compute-dtype "$3" --threads 1 --quiet \
    "${@:4}" | sed -n '/^{/,$p' > "$result.tmp" && mv "$result.tmp" "$result"; }
}
for run in w8a16 w4a16 w8a8; do
  [ -d "$OUT/kernels-$run" ] || $LB quantize --method rtn ${ARGS[$run]} $C --name "kernels-$run" \
    --out "$OUT/kernels-$run" --quiet
  for text in wikitext2 lambada; do
    if [ $run = w8a8 ]; then
      check $run $text bfloat16 --noise-floor
    else
      check $run $text float32 --seq-len 128 --max-tokens 256
      check $run $text bfloat16
    fi
  done
done
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
print("| run | kernel inputs | text | tokens | max abs Δlogit | mean abs Δlogit | top-1 agreement | ppl simulated | ppl real |")
print("|---|---|---|---|---|---|---|---|---|")
for run in ("w8a16", "w4a16", "w8a8"):
    for dtype in ("float32", "bfloat16"):
        for text in ("wikitext2", "lambada"):
            path = Path(sys.argv[1]) / f"kernels-{run}" / f"check-{text}-{dtype}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            inputs = "int8 codes" if run == "w8a8" else dtype
            rows = [(run, inputs, r)] + ([(f"{run} noise floor", "-", r["noise_floor"])] if "noise_floor" in r else [])
            for name, inputs, d in rows:
                print(f"| {name} | {inputs} | {text} | {d['tokens']} | {d['max_logit_diff']:.5g} | "
                      f"{d['mean_logit_diff']:.2g} | {100 * d['top1_agreement']:.1f}% | {d['ppl_a']:.4f} | {d['ppl_b']:.4f} |")
EOF

#!/bin/bash
# GPU check: the embedded model's GPTQ W4 g64 (recipes/wo-gptq.yaml) and best W4 g64 recipe
# (recipes/wo-rotate-gptq.yaml) on cuda (float32 and bfloat16) and on the CPU (float32): perplexity, compression
# time, peak GPU memory, and the perplexity difference to the CPU run; with several GPUs, GPTQ W4 g64 once more
# data-parallel over all of them (torchrun, NCCL). Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (PY=python interpreter, default python)
set -eu
OUT=${1:-runs/gpu-check}
PY=${PY:-python}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
for recipe in wo-gptq wo-rotate-gptq; do
  for run in cuda-float32:cuda:float32 cuda-bfloat16:cuda:bfloat16 cpu-float32:cpu:float32; do
    IFS=: read -r label device dtype <<< "$run"
    [ -d "$OUT/$recipe-$label" ] && continue
    $PY -m lowbit run "recipes/$recipe.yaml" --device "$device" --set dtype="$dtype" --set threads=2 \
      --out "$OUT/$recipe-$label" --quiet > "$OUT/$recipe-$label.txt"
  done
done
# Multi-GPU (NCCL): GPTQ W4 g64 data-parallel over every visible GPU (torchrun), to compare with the 1-GPU row.
# It has not run yet: no machine with several GPUs was available.
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ] && [ ! -d "$OUT/wo-gptq-cuda-float32-x$GPUS" ]; then
  multi="$OUT/wo-gptq-cuda-float32-x$GPUS"
  $PY -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m lowbit run recipes/wo-gptq.yaml \
    --device cuda --set dtype=float32 --set threads=2 --out "$multi" --quiet > "$multi.txt"
fi
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| recipe | device | dtype | ppl | ppl - cpu float32 | quant time s | peak GPU GB | peak RSS GB |")
print("|---|---|---|---|---|---|---|---|")
for recipe in ("wo-gptq", "wo-rotate-gptq"):
    cpu = json.loads((out / f"{recipe}-cpu-float32" / "metrics.json").read_text())["ppl"]["ppl"]
    for label in ("cuda-float32", "cuda-bfloat16", "cpu-float32"):
        m = json.loads((out / f"{recipe}-{label}" / "metrics.json").read_text())
        print(f"| {recipe} | {m['device']} | {m['dtype']} | {m['ppl']['ppl']:.4f} | {m['ppl']['ppl'] - cpu:+.4f} | "
              f"{m['quant_time_s']:.1f} | {m.get('peak_gpu_gb', float('nan')):.2f} | {m['peak_rss_gb']:.2f} |")
cpu = json.loads((out / "wo-gptq-cpu-float32" / "metrics.json").read_text())["ppl"]["ppl"]
for multi in sorted(out.glob("wo-gptq-cuda-float32-x*/metrics.json")):
    m = json.loads(multi.read_text())
    print(f"| wo-gptq, {m['ranks']} GPUs (NCCL) | {m['device']} | {m['dtype']} | {m['ppl']['ppl']:.4f} | "
          f"{m['ppl']['ppl'] - cpu:+.4f} | {m['quant_time_s']:.1f} | {m.get('peak_gpu_gb', float('nan')):.2f} | "
          f"{m['peak_rss_gb']:.2f} |")
PYEOF

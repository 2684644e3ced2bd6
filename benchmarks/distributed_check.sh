#!/bin/bash
# Data-parallel calibration on the CPU (Gloo): the embedded model's GPTQ W4 g64 (recipes/wo-gptq.yaml) and best
# W4 g64 recipe (recipes/wo-rotate-gptq.yaml) as 1 process x 1 thread (the reference: same per-process numerics),
# 1 process x 2 threads, and `torchrun --nproc-per-node 2` x 1 thread. Prints a markdown table: perplexity, its
# difference to 1 x 1, how many saved weights differ from 1 x 1, compression time and wall time. Resumable:
# finished run folders are skipped.
#   bash benchmarks/distributed_check.sh [OUT_DIR]    (PY=interpreter, default python; SETS="--set k=v ..." and
#   RECIPES="wo-gptq" for a cut-down run, e.g. SETS="--set evaluation.max_tokens=4096 --set calibration.n_samples=4
#   --set calibration.batch_size=2": n_samples must be a multiple of 2 x batch_size)
set -eu
OUT=${1:-runs/distributed-check}
PY=${PY:-python}
SETS=${SETS:-}
RECIPES=${RECIPES:-wo-gptq wo-rotate-gptq}
mkdir -p "$OUT"
for recipe in $RECIPES; do
  for run in 1x1 1x2 2x1; do
    IFS=x read -r procs threads <<< "$run"
    dir="$OUT/$recipe-$run"
    [ -d "$dir" ] && continue
    if [ "$procs" = 1 ]; then
      launch=("$PY" -m lowbit)
    else
      launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" -m lowbit)
    fi
    began=$(date +%s.%N)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$threads "${launch[@]}" run "recipes/$recipe.yaml" --set threads="$threads" $SETS \
      --out "$dir" --quiet > "$dir.txt"
    echo "$began $(date +%s.%N)" > "$dir.wall"
  done
done
# shellcheck disable=SC2086
$PY - "$OUT" $RECIPES <<'PYEOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])


def weights(run: Path) -> dict:
    return {k: v for f in sorted((run / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


print("| recipe | processes x threads | ppl | ppl - (1 x 1) | weights differing from 1 x 1 | compression s | wall s |")
print("|---|---|---|---|---|---|---|")
for recipe in sys.argv[2:]:
    ref = json.loads((out / f"{recipe}-1x1" / "metrics.json").read_text())["ppl"]["ppl"]
    ref_w = weights(out / f"{recipe}-1x1")
    for run in ("1x1", "1x2", "2x1"):
        m = json.loads((out / f"{recipe}-{run}" / "metrics.json").read_text())
        w = weights(out / f"{recipe}-{run}")
        differ = sum(int((w[k] != v).sum()) for k, v in ref_w.items())
        start, end = map(float, (out / f"{recipe}-{run}.wall").read_text().split())
        print(f"| {recipe} | {m.get('ranks', 1)} x {m['threads']} | {m['ppl']['ppl']:.4f} | "
              f"{m['ppl']['ppl'] - ref:+.5f} | {differ} of {sum(v.numel() for v in ref_w.values())} | "
              f"{m['quant_time_s']:.1f} | {end - start:.1f} |")
PYEOF

#!/usr/bin/env bash
# Each compressed-tensors export loaded in vLLM and scored on the same WikiText-2 windows as the run it came from
# (benchmarks/vllm_check.py): vLLM's perplexity next to the simulated one, within TOLERANCE (default 0.02).
# Needs a CUDA GPU and vLLM in its own venv (it pins its own torch):
#   python -m venv ~/.cache/lowbit-peers/vllm && ~/.cache/lowbit-peers/vllm/bin/pip install vllm
# Usage: bash benchmarks/vllm_check.sh [RUN ...]    (default: every run of benchmarks/format_table.sh in runs/formats
#        with a compressed-tensors export; VLLM_PY = vLLM's python, PY = lowbit's; MAX_TOKENS, SEQ_LEN as in the .py)
set -euo pipefail
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-$HOME/.cache/lowbit-peers/vllm/bin/python}
"$VLLM_PY" -c "import torch, vllm; assert torch.cuda.is_available()" 2>/dev/null \
  || { echo "vllm_check: needs vLLM ($VLLM_PY) and a CUDA GPU" >&2; exit 2; }
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/formats/*/)
for run in "${RUNS[@]}"; do
  run=${run%/}
  [ -d "$run/compressed-tensors" ] || continue
  out="$run/vllm-check"
  [ -f "$out/simulated.json" ] || "$PY" benchmarks/vllm_check.py windows "$run" "$out"
  [ -f "$out/vllm.json" ] || "$VLLM_PY" benchmarks/vllm_check.py score "$run/compressed-tensors" "$out"
done
"$PY" - "${RUNS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
print("| run | simulated ppl | vLLM ppl | relative difference | within tolerance |")
print("|---|---|---|---|---|")
for run in sys.argv[1:]:
    path = Path(run) / "vllm-check" / "vllm.json"
    if path.is_file():
        r = json.loads(path.read_text())
        print(f"| {Path(run).name} | {r['simulated_ppl']:.3f} | {r['vllm_ppl']:.3f} | {100 * r['rel_diff']:.2f}% | {r['ok']} |")
PYEOF

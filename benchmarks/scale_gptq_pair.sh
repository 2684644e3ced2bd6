#!/usr/bin/env bash
# GPTQ W4 g128 on the Llama-3.2-1B shape in float32 (docs/scale.md, "Side by side with llm-compressor"): lowbit
# streamed, llm-compressor's oneshot (whole model in memory, its default GPTQ settings on both sides), then lowbit
# again with torch's own float32 CPU GEMM (LOWBIT_CPU_GEMM=torch, the kernels llm-compressor runs), on the same
# 8 x 512 windows, 2 threads, one run at a time; rows appended to R/peers.jsonl.
# Usage: VENVS=/path/to/peer/venvs bash benchmarks/scale_gptq_pair.sh [R]       (run it alone on the machine)
set -euo pipefail
R=${1:-runs/scale}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
PY=${PY:-.venv/bin/python}
M=$R/llama-3.2-1b
mkdir -p "$R"
[ -d "$M" ] || "$PY" -m lowbit synth llama-3.2-1b "$M" --threads 2
printf 'model: %s\nsteps: [rtn]\ncalibration: {n_samples: 8, seq_len: 512}\n' "$M" > "$R/windows.yaml"
[ -f "$R/calib-1b.pt" ] || "$PY" benchmarks/peers/to_run.py windows "$R/windows.yaml" "$R/calib-1b.pt"
"$PY" benchmarks/scale_bench.py "$M" gptq "$R/peers.jsonl" --dtype float32 --label llama-3.2-1b-gptq-float32-lowbit
"$VENVS/llmcompressor/bin/python" benchmarks/peers/llmcompressor_run.py "$M" "$R/calib-1b.pt" "$R/llmc-1b-gptq" \
  --method gptq --group-size 128 --dtype float32 --metrics-only
"$PY" benchmarks/peers/peer_row.py "$M" gptq float32 "$R/llmc-1b-gptq" "$R/peers.jsonl"
LOWBIT_CPU_GEMM=torch "$PY" benchmarks/scale_bench.py "$M" gptq "$R/peers.jsonl" --dtype float32 \
  --label llama-3.2-1b-gptq-float32-lowbit-torchgemm

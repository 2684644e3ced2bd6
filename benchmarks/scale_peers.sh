#!/usr/bin/env bash
# lowbit (streamed, one block in memory) against llm-compressor's oneshot (whole model in memory) on the
# Llama-3.2-1B and -3B shapes (docs/scale.md, "Side by side with llm-compressor"): data-free RTN W4 g128 in bf16,
# and GPTQ W4 g128 on the 1B shape in float32 (llm-compressor's default GPTQ settings on both sides, the same
# 8 x 512 windows; benchmarks/scale_gptq_pair.sh), 2 threads, one run at a time; peak RSS and compression time,
# rows appended to R/peers.jsonl.
# Usage: VENVS=/path/to/peer/venvs bash benchmarks/scale_peers.sh [R]       (run it alone on the machine)
set -euo pipefail
R=${1:-runs/scale}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
PY=${PY:-.venv/bin/python}
LLMC="$VENVS/llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py"
mkdir -p "$R"
for shape in llama-3.2-1b llama-3.2-3b; do
  M=$R/$shape
  [ -d "$M" ] || "$PY" -m lowbit synth "$shape" "$M" --threads 2
  "$PY" benchmarks/scale_bench.py "$M" rtn "$R/peers.jsonl" --label "$shape-rtn-bfloat16-lowbit"
  $LLMC "$M" - "$R/llmc-$shape-rtn" --method rtn --group-size 128 --dtype bfloat16 --metrics-only
  "$PY" benchmarks/peers/peer_row.py "$M" rtn bfloat16 "$R/llmc-$shape-rtn" "$R/peers.jsonl"
done
bash benchmarks/scale_gptq_pair.sh "$R"

#!/bin/bash
# Every measurement of docs/scale.md, in order of importance; results are appended to $R/results.jsonl.
# Usage (from the repository root): bash benchmarks/scale_suite.sh [R]
set -u
R=${1:-runs/scale}
export PY=${PY:-python}
bench() { $PY benchmarks/scale_bench.py "$@" || echo "failed: $*"; }
synth() { [ -d "$R/$2" ] || $PY -m lowbit synth "$1" "$R/$2" --threads 2 ${3:+--layers $3}; }
echo "start $(date -u)"
synth llama-3.2-1b llama-3.2-1b
bench "$R/llama-3.2-1b" rtn "$R/results.jsonl"
synth llama-3.1-8b llama-3.1-8b
bench "$R/llama-3.1-8b" rtn "$R/results.jsonl"
synth llama-3.1-8b llama-3.1-8b-2l 2
bench "$R/llama-3.1-8b-2l" rtn "$R/results.jsonl"
bench "$R/llama-3.1-8b-2l" gptq "$R/results.jsonl"
bench "$R/llama-3.1-8b-2l" gptq "$R/results.jsonl" --dtype float32
bench "$R/llama-3.1-8b" gptq "$R/results.jsonl"
echo "resume check $(date -u)"
bash benchmarks/resume_check.sh "$R/resume" > "$R/resume.txt" 2>&1
synth llama-3.2-3b llama-3.2-3b
bench "$R/llama-3.2-3b" rtn "$R/results.jsonl"
bench "$R/llama-3.2-1b" gptq "$R/results.jsonl" --dtype float32
$PY benchmarks/scale_plot.py "$R/results.jsonl" "$R/scale_memory.png"
echo "end $(date -u)"

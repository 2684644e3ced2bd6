#!/usr/bin/env bash
# The speed comparison of docs/scale.md ("Compression time") repeated in alternating rounds, since one run of
# either tool varies by 5-10% on this machine: each round runs llm-compressor's oneshot, then lowbit with its
# per-block diagnostics, lowbit without, and lowbit with torch's own float32 CPU GEMM (LOWBIT_CPU_GEMM=torch, the
# kernels llm-compressor runs; diagnostics on), on the same work as benchmarks/speed_table.sh (without evaluation:
# speed_table.sh gives the perplexities). Prints each round's times and ratios, and their medians; checks that
# the lowbit runs of each GEMM wrote the same weights.
# Usage: VENVS=/path/to/peer/venvs bash benchmarks/speed_rounds.sh OUT [ROUNDS]   (run it alone on the machine)
set -euo pipefail
OUT=${1:?output folder}
ROUNDS=${2:-3}
VENVS=${VENVS:-$HOME/.cache/lowbit-peers}
PY=${PY:-.venv/bin/python}
HERE=$(dirname "$0")
R=recipes/wo-gptq-static.yaml
MODEL=$("$PY" -c "from lowbit.loading import embedded_model_path; print(embedded_model_path())")
mkdir -p "$OUT"
[ -f "$OUT/calib.pt" ] || "$PY" "$HERE/peers/to_run.py" windows "$R" "$OUT/calib.pt"
for k in $(seq 1 "$ROUNDS"); do
  D="$OUT/round$k"
  mkdir -p "$D"
  [ -f "$D/llmc/peer_metrics.json" ] || "$VENVS/llmcompressor/bin/python" "$HERE/peers/llmcompressor_run.py" \
    "$MODEL" "$OUT/calib.pt" "$D/llmc" --method gptq --threads 2 --metrics-only > "$D/llmc.log" 2>&1
  [ -f "$D/lowbit/metrics.json" ] || "$PY" -m lowbit run "$R" --set evaluation=null --out "$D/lowbit" --quiet
  [ -f "$D/lowbit-nodiag/metrics.json" ] || "$PY" -m lowbit run "$R" --set evaluation=null --set diagnostics=false \
    --out "$D/lowbit-nodiag" --quiet
  [ -f "$D/lowbit-torchgemm/metrics.json" ] || LOWBIT_CPU_GEMM=torch "$PY" -m lowbit run "$R" --set evaluation=null \
    --out "$D/lowbit-torchgemm" --quiet
done
"$PY" - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/rounds.md"
import json, statistics, sys
from pathlib import Path
from lowbit.checkpoint import file_checksum

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
runs = ("lowbit", "lowbit-nodiag", "lowbit-torchgemm")
rows, weights = [], {"onednn": set(), "torch": set()}
for k in range(1, rounds + 1):
    d = out / f"round{k}"
    llmc = json.loads((d / "llmc" / "peer_metrics.json").read_text())["quant_time_s"]
    rows.append((k, llmc, *(json.loads((d / run / "metrics.json").read_text())["quant_time_s"] for run in runs)))
    for run in runs:
        files = tuple(file_checksum(p) for p in sorted((d / run / "model").glob("*.safetensors")))
        weights["torch" if run.endswith("torchgemm") else "onednn"].add(files)
print("| round | llm-compressor s | lowbit s (diagnostics on) | ratio | lowbit s (off) | ratio "
      "| lowbit s (torch GEMM, on) | ratio |\n|---|---|---|---|---|---|---|---|")
for k, llmc, *times in rows:
    print(f"| {k} | {llmc:.1f} | " + " | ".join(f"{t:.1f} | {t / llmc:.2f}" for t in times) + " |")
med = [statistics.median(r[i] for r in rows) for i in range(1, 2 + len(runs))]
ratios = [statistics.median(r[i] / r[1] for r in rows) for i in range(2, 2 + len(runs))]
print(f"| median | {med[0]:.1f} | " + " | ".join(f"{t:.1f} | {q:.2f}" for t, q in zip(med[1:], ratios)) + " |")
for gemm, seen in weights.items():
    print(f"\nlowbit's weights identical in all runs with the {gemm} GEMM: {len(seen) == 1}")
EOF

#!/usr/bin/env bash
# The speed comparison of docs/scale.md ("Compression time") repeated in alternating rounds, since one run of
# either tool varies by 5-10% on this machine: each round runs llm-compressor's oneshot, then lowbit with its
# per-block diagnostics, then lowbit without, on the same work as benchmarks/speed_table.sh (without evaluation:
# speed_table.sh gives the perplexities). Prints each round's times and ratios, and their medians; checks that
# every lowbit run wrote the same weights.
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
done
"$PY" - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/rounds.md"
import json, statistics, sys
from pathlib import Path
from lowbit.checkpoint import file_checksum

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
rows, weights = [], set()
for k in range(1, rounds + 1):
    d = out / f"round{k}"
    llmc = json.loads((d / "llmc" / "peer_metrics.json").read_text())["quant_time_s"]
    times = [json.loads((d / run / "metrics.json").read_text())["quant_time_s"] for run in ("lowbit", "lowbit-nodiag")]
    rows.append((k, llmc, *times))
    for run in ("lowbit", "lowbit-nodiag"):
        weights.add(tuple(file_checksum(p) for p in sorted((d / run / "model").glob("*.safetensors"))))
print("| round | llm-compressor s | lowbit s (diagnostics on) | ratio | lowbit s (off) | ratio |\n|---|---|---|---|---|---|")
for k, llmc, on, off in rows:
    print(f"| {k} | {llmc:.1f} | {on:.1f} | {on / llmc:.2f} | {off:.1f} | {off / llmc:.2f} |")
med = [statistics.median(r[i] for r in rows) for i in (1, 2, 3)]
ratios_on = statistics.median(r[2] / r[1] for r in rows)
ratios_off = statistics.median(r[3] / r[1] for r in rows)
print(f"| median | {med[0]:.1f} | {med[1]:.1f} | {ratios_on:.2f} | {med[2]:.1f} | {ratios_off:.2f} |")
print(f"\nlowbit's weights identical in all {2 * rounds} runs: {len(weights) == 1}")
EOF

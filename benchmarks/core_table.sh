#!/usr/bin/env bash
# Round-to-nearest baselines on the embedded model (docs/results.md, "Core" section).
# Usage: bash benchmarks/core_table.sh [OUT_DIR]   (needs `make install`; about 20 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/core}
LB=${LB:-.venv/bin/lowbit}
COMMON=(--method rtn --max-tokens 16384 --threads ${THREADS:-2} --quiet)
run() { local name=$1; shift; [ -d "$OUT/$name" ] || "$LB" quantize "${COMMON[@]}" --name "$name" --out "$OUT/$name" "$@"; }
run w8-channel --wbits 8 --sym
run w4-channel --wbits 4
run w4-g64 --wbits 4 --group-size 64
run w3-g64 --wbits 3 --group-size 64
run w2-g64 --wbits 2 --group-size 64
run w8a8-token --wbits 8 --sym --abits 8
run w4a8-token --wbits 4 --group-size 64 --abits 8
"$LB" report "$OUT"/w8-channel "$OUT"/w4-channel "$OUT"/w4-g64 "$OUT"/w3-g64 "$OUT"/w2-g64 "$OUT"/w8a8-token "$OUT"/w4a8-token

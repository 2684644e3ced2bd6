"""Append an llm-compressor run's metrics (its peer_metrics.json) as a row of a peers.jsonl table, next to the
rows benchmarks/scale_bench.py writes for lowbit.

Usage: python benchmarks/peers/peer_row.py MODEL_DIR METHOD DTYPE PEER_DIR RESULTS.jsonl
"""
import json
import sys
import time
from pathlib import Path

model, method, dtype, peer, out = sys.argv[1:]
m = json.loads((Path(peer) / "peer_metrics.json").read_text())
weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
row = {"label": f"{Path(model).name}-{method}-{dtype}-llmc", "tool": m["tool"], "model": Path(model).name,
       "method": method, "dtype": dtype, "weights_gb": weights / 1e9, "peak_rss_gb": m["peak_rss_gb"],
       "quant_time_s": m["quant_time_s"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))

"""Peak RSS and wall time of one streamed compression run on a (synthetic) model folder; appends a JSON line.

Usage: python benchmarks/scale_bench.py MODEL_DIR METHOD RESULTS.jsonl [--dtype auto] [--n-samples 8]
       [--seq-len 512] [--label NAME]
Runs `lowbit run` in a fresh process (threads 2, stream: true, W4 g128 asymmetric, no evaluation, no per-block
diagnostics: their bf16 forward passes would dominate a data-free RTN run on a CPU without bf16 units; GPTQ with
llm-compressor's default settings: act-order with static groups, damp 0.01), keeps its
metrics.json and deletes the written model afterwards (random weights, kept only to measure). `peak_rss_gb` is
the run's own high-water mark at the end of compression, `process_peak_rss_gb` the process's over its whole
life, saving included (both in GiB).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("method", choices=["rtn", "gptq"])
    p.add_argument("results")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--label")
    p.add_argument("--keep", action="store_true", help="keep the written model")
    args = p.parse_args()
    model = Path(args.model)
    label = args.label or f"{model.name}-{args.method}-{args.dtype}"
    work = Path(args.results).parent / "bench"
    work.mkdir(parents=True, exist_ok=True)
    recipe = {"name": label, "model": str(model), "threads": 2, "dtype": args.dtype, "stream": True,
              "weights": {"bits": 4, "group_size": 128, "symmetric": False}, "steps": [args.method if args.method == "rtn" else {"gptq": {"damp": 0.01, "act_order": True, "observer": "minmax", "diag_damp": 0}}],
              "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "batch_size": 8},
              "evaluation": None, "diagnostics": False}
    recipe_file = work / f"{label}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowbit", "run", str(recipe_file), "--out", str(out), "--quiet"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"run failed: {done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    row = {"label": label, "model": model.name, "method": args.method, "dtype": metrics["dtype"],
           "calibration": f"{args.n_samples}x{args.seq_len}", "blocks": json.loads((model / "config.json").read_text())
           ["num_hidden_layers"], "weights_gb": weights / 1e9, "peak_rss_gb": metrics["peak_rss_gb"],
           "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
           "quant_time_s": metrics["quant_time_s"], "wall_s": wall, "cpu_gemm": metrics["cpu_gemm"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    if not args.keep:
        shutil.rmtree(out / "model", ignore_errors=True)


if __name__ == "__main__":
    main()

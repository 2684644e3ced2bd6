"""Peak host memory against model size from benchmarks/scale_bench.py's results (docs/scale.md).

Usage: python benchmarks/scale_plot.py RESULTS.jsonl OUT.png
One marker per row (method x dtype), the model's own bf16 weight size as the reference line: a run that loaded
the whole model would sit on or above it; a streamed one stays flat as the model grows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    latest = {}  # a measurement repeated later replaces the earlier one
    for r in rows:
        latest[(r["model"], r["method"], r["dtype"])] = r
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = sorted({r["weights_gb"] for r in latest.values()})
    ax.plot(sizes, sizes, "k:", label="model weights (bf16)")
    for (method, dtype), marker in {("rtn", "bfloat16"): "o", ("gptq", "float32"): "s"}.items():
        pts = sorted((r["weights_gb"], r["peak_rss_gb"], r["model"]) for r in latest.values()
                     if r["method"] == method and r["dtype"] == dtype)
        if not pts:
            continue
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker + "-",
                label=f"{method.upper()} W4 g128, streamed ({dtype} compute)")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model weights on disk (GB)")
    ax.set_ylabel("peak RSS while compressing (GB)")
    ax.set_title("Peak host memory vs model size (2 CPU threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

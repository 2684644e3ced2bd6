"""Peak host memory against model size from benchmarks/scale_bench.py's results (docs/scale.md).

Usage: python benchmarks/scale_plot.py RESULTS.jsonl OUT.png
One curve per method over the full-depth shapes, open markers for shapes cut to a few blocks, and the model's own
bf16 weight size as the reference line: a run that loaded the whole model would sit on or above it; a streamed
one grows with the block (and embedding) size, not with the number of blocks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def _cut(row: dict) -> bool:
    """A shape cut to fewer blocks (`lowbit synth --layers`): same block size, far fewer blocks."""
    return row["model"].endswith("l") and row["model"].rsplit("-", 1)[-1][:-1].isdigit()


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
    styles = {("rtn", "bfloat16"): ("o", "C0"), ("gptq", "bfloat16"): ("^", "C2"), ("gptq", "float32"): ("s", "C1")}
    for (method, dtype), (marker, colour) in styles.items():
        rows = [r for r in latest.values() if r["method"] == method and r["dtype"] == dtype]
        label = f"{method.upper()} W4 g128, streamed ({dtype} compute)"
        full = sorted((r["weights_gb"], r["peak_rss_gb"]) for r in rows if not _cut(r))
        if full:  # full-depth models: the curve; models cut to a few blocks: open markers beside it
            ax.plot([x for x, _ in full], [y for _, y in full], marker + "-", color=colour, label=label)
        for r in rows:
            if _cut(r):
                ax.plot(r["weights_gb"], r["peak_rss_gb"], marker, color=colour, mfc="none",
                        label=None if full else label)
            ax.annotate(f"{r['model']} ({r['blocks']} blocks)", (r["weights_gb"], r["peak_rss_gb"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.margins(x=0.2)
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

"""Perplexity against size of uniform and budgeted mixed-precision runs (their metrics.json), as a PNG and a table.

Usage: python benchmarks/mixed_plot.py OUT.png RUN_DIR ...   (uniform runs, and budgeted runs: one curve per
allocation metric)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def load(dirs: list[str]) -> dict[str, list[dict]]:
    """metrics.json of each run, split into the uniform curve and one mixed curve per allocation metric, each
    sorted by size."""
    curves: dict[str, list[dict]] = {"uniform": []}
    for d in dirs:
        m = json.loads((Path(d) / "metrics.json").read_text())
        key = f"mixed, {m['allocation']['metric']} metric" if "allocation" in m else "uniform"
        curves.setdefault(key, []).append(m)
    return {k: sorted(v, key=lambda m: m["size_mb"]) for k, v in curves.items()}


def main(out: str, dirs: list[str]) -> None:
    curves = load(dirs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, style in zip(curves, ("o-", "s--", "^-.", "v:")):
        rows = curves[label]
        if rows:
            ax.plot([m["size_mb"] for m in rows], [m["ppl"]["ppl"] for m in rows], style,
                    label="uniform (GPTQ act-order + mse)" if label == "uniform" else f"{label} (same solver)")
    for m in curves["uniform"]:
        ax.annotate(m["weights"].split(" asym")[0], (m["size_mb"], m["ppl"]["ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    fp = next((m["ppl_fp"]["ppl"] for rows in curves.values() for m in rows if "ppl_fp" in m), None)
    if fp:
        ax.axhline(fp, color="grey", lw=0.8, ls=":", label=f"FP32 ({fp:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("size MB (codes, scales, zero points; other parameters at 16 bits)")
    ax.set_ylabel("WikiText-2 perplexity (8188 tokens)")
    ax.set_title("SmolLM2-135M: perplexity vs size", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("| run | weights | avg bits | size MB | WikiText-2 ppl | LAMBADA ppl |\n|---|---|---|---|---|---|")
    for rows in curves.values():
        for m in rows:
            bits = m["allocation"]["avg_bits"] if "allocation" in m else ""
            ood = m.get("ppl_texts", {}).get("lambada", {}).get("ppl")
            print(f"| {m['name']} | {m['weights']} | {bits and f'{bits:.3f}'} | {m['size_mb']:.2f} | "
                  f"{m['ppl']['ppl']:.3f} | {'-' if ood is None else f'{ood:.3f}'} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Comparison figure and HTML page for saved runs: quality vs size (Pareto view), block errors, time, memory."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from lowbit.diagnostics import blocks_table, read_blocks
from lowbit.errors import LowbitError

MARKERS = "osD^vP*Xh<>p"


def method_of(m: dict) -> str:
    """A run's method label: its steps (or 'rtn' when none) and activation format; 'fp' when nothing is quantized."""
    if m.get("weights", "fp") == "fp" and m.get("activations", "fp") == "fp":
        return "fp (not quantized)"
    steps = "+".join(m.get("steps") or []) or "rtn"
    acts = "" if m.get("activations", "fp") == "fp" else " · A" + m["activations"]
    return f"{steps}{acts}"


def quality(m: dict) -> tuple[float | None, str]:
    """(value, axis label): compressed perplexity if the run has it, else mean task accuracy in percent."""
    if "ppl" in m:
        return m["ppl"]["ppl"], f"perplexity ({m['ppl']['tokens']} tokens, lower is better)"
    tasks = m.get("tasks") or {}
    accs = [row["acc"] for row in tasks.values() if "acc" in row]
    if accs:
        return 100 * sum(accs) / len(accs), f"mean task accuracy % ({', '.join(tasks)}; higher is better)"
    return None, ""


def pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """Points not beaten by a smaller-or-equal-size point, in order of size."""
    front, best = [], None
    for x, y in sorted(points):
        if best is None or (y < best if lower_is_better else y > best):
            front.append((x, y))
            best = y
    return front


def _log_if_wide(ax, values: list[float], axis: str = "y") -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def comparison_figure(runs: list[Path], rows: list[dict]):
    """Four panels: quality vs size in MB (one marker per method, Pareto front), per-block output error
    against the FP path, quantization time and peak memory per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.name for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = axes[0, 0]
    methods = list(dict.fromkeys(method_of(m) for m in rows))
    points, ylabel, values = [], "", []
    for m, label in zip(rows, labels):
        y, ylabel_m = quality(m)
        if y is None:
            continue
        ylabel = ylabel or ylabel_m
        k = methods.index(method_of(m))
        ax.scatter(m["size_mb"], y, marker=MARKERS[k % len(MARKERS)], color=f"C{k % 10}", s=70,
                   label=method_of(m), zorder=3)
        ax.annotate(f"{label}\nW:{m['weights']}", (m["size_mb"], y), fontsize=7, xytext=(5, 4),
                    textcoords="offset points")
        points.append((m["size_mb"], y))
        values.append(y)
    fp = [m for m in rows if "ppl_fp" in m and "ppl" in m]
    if fp and ylabel.startswith("perplexity"):
        ax.scatter(fp[0]["size_fp16_mb"], fp[0]["ppl_fp"]["ppl"], marker="*", color="k", s=150, label="FP16 model",
                   zorder=3)
        points.append((fp[0]["size_fp16_mb"], fp[0]["ppl_fp"]["ppl"]))
        values.append(fp[0]["ppl_fp"]["ppl"])
    if points:
        front = pareto(points, lower_is_better=ylabel.startswith("perplexity"))
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    _log_if_wide(ax, values)
    ax.set_xlabel("size of the weights (MB)")
    ax.set_ylabel(ylabel or "no perplexity or task accuracy in these runs")
    ax.set_title("quality against size (one marker per method)")
    ax.grid(alpha=0.3, which="both")

    ax = axes[0, 1]
    errors = []
    for run, label in zip(runs, labels):
        try:
            blocks = read_blocks(run)
        except LowbitError:  # a run from before diagnostics existed has no curve
            continue
        ys = [b["output_rel_error"] for b in blocks]
        ax.plot([b["index"] for b in blocks], ys, marker=".", label=label)
        errors += ys
    _log_if_wide(ax, errors)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error vs FP path  ‖y_q − y_fp‖ / ‖y_fp‖")
    ax.set_title("per-block output error (accumulated over blocks)")
    ax.grid(alpha=0.3, which="both")
    if errors:
        ax.legend(fontsize=8)

    for ax, key, unit, title in ((axes[1, 0], "quant_time_s", "quantization time (s)", "time to compress"),
                                 (axes[1, 1], "peak_rss_gb", "peak resident memory (GB)", "peak memory")):
        vals = [m.get(key, 0.0) for m in rows]
        ax.barh(range(len(rows)), vals, color=[f"C{methods.index(method_of(m)) % 10}" for m in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        _log_if_wide(ax, vals, "x")
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    return fig


def _md_to_html(table: str) -> str:
    """A markdown table (as results_table prints it) as an HTML table."""
    rows = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out) + "</table>"


def write_html(path: Path, table: str, fig, runs: list[Path]) -> None:
    """One self-contained page: the results table, the figure (embedded PNG), each run's block table."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    img = base64.b64encode(buf.getvalue()).decode()
    parts = ["<!doctype html><meta charset='utf-8'><title>lowbit report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style>",
             "<h1>lowbit report</h1>", _md_to_html(table), f"<img alt='comparison' src='data:image/png;base64,{img}'>"]
    for run in runs:
        try:
            blocks = read_blocks(run)
        except LowbitError:
            continue
        parts += [f"<h2>blocks of {html.escape(run.name)}</h2>", _md_to_html(blocks_table(blocks))]
    path.write_text("\n".join(parts))

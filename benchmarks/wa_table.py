"""Pivot saved weight-activation runs into one perplexity table: a row per format, a column per method.

    python benchmarks/wa_table.py runs/smooth/*

Reads each run folder's metrics.json (written by `lowbit run`); missing combinations print as "-".
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def format_label(m: dict) -> tuple[tuple, str]:
    """Sort key and label such as 'W6A6 dynamic per-token' from a run's weight and activation descriptions."""
    wbits = int(re.match(r"int(\d+)", m["weights"]).group(1))
    abits = int(re.match(r"int(\d+)", m["activations"]).group(1))
    dynamic = "dynamic" in m["activations"]
    kind = "dynamic per-token" if dynamic else "static per-tensor"
    return (not dynamic, -wbits, -abits), f"W{wbits}A{abits} {kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    cells: dict[str, dict[str, float]] = {}
    keys: dict[str, tuple] = {}
    methods: list[str] = []
    fp = None
    for run in args.runs:
        path = run / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        key, label = format_label(m)
        keys[label] = key
        method = "+".join(m["steps"])
        if method not in methods:
            methods.append(method)
        cells.setdefault(label, {})[method] = m["ppl"]["ppl"]
        fp = m.get("ppl_fp", {}).get("ppl", fp)
    order = ["rtn", "smoothquant", "os", "osplus"]
    methods.sort(key=lambda s: order.index(s) if s in order else len(order))
    print("| format | FP | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for label in sorted(cells, key=keys.__getitem__):
        row = [f"{cells[label][m]:.2f}" if m in cells[label] else "-" for m in methods]
        print(f"| {label} | {fp:.2f} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

"""Pivot saved runs into one perplexity table: a row per format, a column per method.

    python benchmarks/pivot.py runs/wo/*          # or runs/smooth/*, runs/recon/*

Reads each run folder's metrics.json (written by `lowbit run`). The method is the run's name without a trailing
format tag (`gptq-ao-mse-w4ch` -> `gptq-ao-mse`); the format is its weights and activations. Each cell shows the
perplexity and its change from FP; missing combinations print as "-". Runs evaluated on different tokens
(a different FP perplexity) are refused: they do not belong in one table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    cells: dict[str, dict[str, float]] = {}
    methods: list[str] = []
    fps: set[float] = set()
    for run in args.runs:
        path = run / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        method = re.sub(r"-w\d[\w]*$", "", m["name"])
        fmt = m["weights"] if m["activations"] == "fp" else f"{m['weights']} / {m['activations']}"
        if method not in methods:
            methods.append(method)
        cells.setdefault(fmt, {})[method] = m["ppl"]["ppl"]
        fps.add(round(m["ppl_fp"]["ppl"], 4))
    if len(fps) != 1:
        sys.exit(f"runs were evaluated against different FP perplexities {sorted(fps)}: pivot them separately")
    fp = fps.pop()
    print(f"| weights / activations (FP {fp:.3f}) | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for fmt, row in cells.items():
        out = [f"{row[m]:.3f} ({100 * (row[m] / fp - 1):+.1f}%)" if m in row else "-" for m in methods]
        print(f"| {fmt} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()

"""Pivot saved runs into one perplexity table: a row per format, a column per method.

    python benchmarks/pivot.py runs/wo/*          # or runs/smooth/*, runs/recon/*

Reads each run folder's metrics.json (written by `lowbit run`). The method is the run's name without a trailing
format tag (`gptq-ao-mse-w4ch` -> `gptq-ao-mse`); the format is its weights and activations. Each cell shows the
perplexity and its change from FP on every text the runs were all evaluated on (WikiText-2 / LAMBADA for the
current recipes); missing combinations print as "-". Runs evaluated on different tokens (a different FP
perplexity) are refused: they do not belong in one table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def texts_of(m: dict, key: str) -> dict[str, float]:
    """Perplexity by text of a run's metrics (`key`: "ppl" or "ppl_fp"); runs from before multi-text evaluation
    scored WikiText-2 only."""
    by_text = m.get(f"{key}_texts") or {"wikitext2": m[key]}
    return {text: r["ppl"] for text, r in by_text.items()}


def change(ppl: float, fp: float) -> str:
    """The increase over FP: a percentage, or a factor from 10x up."""
    return f"{100 * (ppl / fp - 1):+.1f}%" if ppl < 10 * fp else f"x{ppl / fp:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    cells: dict[str, dict[str, dict[str, float]]] = {}
    methods: list[str] = []
    texts: list[str] | None = None
    fps: dict[str, set[float]] = {}
    for run in args.runs:
        path = run / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        method = re.sub(r"-w\d[\w]*$", "", m["name"])
        fmt = m["weights"] if m["activations"] == "fp" else f"{m['weights']} / {m['activations']}"
        if method not in methods:
            methods.append(method)
        ppl, fp = texts_of(m, "ppl"), texts_of(m, "ppl_fp")
        texts = list(ppl) if texts is None else [t for t in texts if t in ppl]
        cells.setdefault(fmt, {})[method] = ppl
        for text, value in fp.items():
            fps.setdefault(text, set()).add(round(value, 4))
    if texts is None:
        sys.exit("no run folder with a metrics.json among the arguments")
    for text in texts:
        if len(fps[text]) != 1:
            sys.exit(f"runs were evaluated against different FP perplexities on {text} {sorted(fps[text])}: "
                     f"pivot them separately")
    fp = {text: fps[text].pop() for text in texts}
    print(f"| weights / activations (FP {' / '.join(f'{fp[t]:.3f}' for t in texts)}; {' / '.join(texts)}) | "
          + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for fmt, row in cells.items():
        out = [" / ".join(f"{row[m][t]:.3f} ({change(row[m][t], fp[t])})" for t in texts) if m in row else "-"
               for m in methods]
        print(f"| {fmt} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()

"""The format table of docs/results.md: one row per weight format, RTN and GPTQ side by side, each with the
perplexity of its compressed-tensors export as reloaded on the CPU.

    python benchmarks/format_pivot.py runs/formats      # folders SOLVER-FORMAT written by benchmarks/format_table.sh

Reads each run's metrics.json (`lowbit run`) and verify-TEXT.json (`lowbit verify` of its compressed-tensors
export on each text; "-" where the format has none). Each perplexity cell is WikiText-2 / LAMBADA. Size is
`lowbit report`'s: codes plus every scale and zero point.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SOLVERS = ("rtn", "gptq")
TEXTS = ("wikitext2", "lambada")


def _texts(metrics: dict, key: str) -> str:
    """A run's perplexity (`key`: ppl or ppl_fp) on each text, "W / L"."""
    by_text = metrics.get(f"{key}_texts", {})
    return " / ".join(f"{by_text[t]['ppl']:.3f}" if t in by_text else "-" for t in TEXTS)


def _cell(run: Path) -> tuple[str, str] | None:
    """(simulated ppl, exported ppl) of one run folder on each text, or None if it has not run."""
    if not (run / "metrics.json").is_file():
        return None
    sim = _texts(json.loads((run / "metrics.json").read_text()), "ppl")
    files = [run / f"verify-{t}.json" for t in TEXTS]
    exported = " / ".join(f"{json.loads(f.read_text())['ppl_b']:.3f}" if f.is_file() else "-" for f in files)
    return sim, exported if any(f.is_file() for f in files) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    formats = sorted({p.name.split("-", 1)[1] for p in args.out.iterdir() if (p / "metrics.json").is_file()})
    print("| weights | activations | size MB | FP ppl | RTN ppl | RTN exported | GPTQ ppl | GPTQ exported |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt in formats:
        runs = {s: args.out / f"{s}-{fmt}" for s in SOLVERS}
        m = next(json.loads((r / "metrics.json").read_text()) for r in runs.values() if (r / "metrics.json").is_file())
        cells = [c for s in SOLVERS for c in (_cell(runs[s]) or ("-", "-"))]
        print(f"| {m['weights']} | {m['activations']} | {m['size_mb']:.1f} | {_texts(m, 'ppl_fp')} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

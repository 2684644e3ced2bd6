"""The format table of docs/results.md: one row per weight format, RTN and GPTQ side by side, each with the
perplexity of its compressed-tensors export as reloaded on the CPU.

    python benchmarks/format_pivot.py runs/formats      # folders SOLVER-FORMAT written by benchmarks/format_table.sh

Reads each run's metrics.json (`lowbit run`) and verify.json (`lowbit verify` of its compressed-tensors export;
"-" where the format has none). Size is `lowbit report`'s: codes plus every scale and zero point.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SOLVERS = ("rtn", "gptq")


def _cell(run: Path) -> tuple[str, str] | None:
    """(simulated ppl, exported ppl) of one run folder, or None if it has not run."""
    if not (run / "metrics.json").is_file():
        return None
    sim = json.loads((run / "metrics.json").read_text())["ppl"]["ppl"]
    verify = run / "verify.json"
    exported = f"{json.loads(verify.read_text())['ppl_b']:.3f}" if verify.is_file() else "-"
    return f"{sim:.3f}", exported


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
        print(f"| {m['weights']} | {m['activations']} | {m['size_mb']:.1f} | {m['ppl_fp']['ppl']:.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

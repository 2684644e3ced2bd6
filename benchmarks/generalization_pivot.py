"""In-domain / out-of-domain table and the bars of docs/results.md ("Quality outside the calibration text").

    python benchmarks/generalization_pivot.py runs/generalization

Reads the run folders written by benchmarks/generalization_table.sh (lowbit cells METHOD-FORMAT and imported
peers peer-TOOL-FORMAT): a row per method, for each format the perplexity on the first text (in domain) and the
second (out of domain) with their change from FP, and the size. Then the three checks the table exists for:
each calibrated solver's out-of-domain gain over round-to-nearest of the same format (and zero-point choice)
against half its in-domain gain; the best recipe at equal size against half of HQQ's out-of-domain increase; and
GPTQ's step defaults (symmetric) against GPTQModel's on both texts.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NOT_SOLVERS = {"rtn", "rtn-sym", "peer-hqq", "peer-gptqmodel-sym"}
ORDER = ["rtn", "gptq", "gptq-default", "gptq-ao-mse", "awq", "lwc", "best", "best-equal", "best-mixed", "rtn-sym",
         "gptq-sym", "gptq-default-sym", "peer-hqq", "peer-gptqmodel-sym"]


def load(root: Path) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{format: {method: metrics}} from every finished run under root, and the texts in order."""
    cells: dict[str, dict[str, dict]] = {}
    texts: list[str] = []
    for run in sorted(root.iterdir()):
        path = run / "metrics.json"
        match = re.fullmatch(r"(.+)-(w\dg\d+)", run.name)
        if not path.is_file() or not match:
            continue
        m = json.loads(path.read_text())
        if "ppl_texts" not in m:
            sys.exit(f"{run}: scored on one text only; this table needs two (evaluation.data: [in, out])")
        texts = texts or list(m["ppl_texts"])
        if list(m["ppl_texts"]) != texts:
            sys.exit(f"{run}: scored on {list(m['ppl_texts'])}, the others on {texts}")
        cells.setdefault(match[2], {})[match[1]] = m
    if not cells:
        sys.exit(f"no finished METHOD-FORMAT runs under {root}")
    return cells, texts


def rise(m: dict, text: str) -> float:
    """Perplexity increase over FP on one text, in percent."""
    return 100 * (m["ppl_texts"][text]["ppl"] / m["ppl_fp_texts"][text]["ppl"] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    cells, texts = load(args.root)
    inside, outside = texts[:2]
    formats = sorted(cells, reverse=True)
    methods = sorted({k for f in formats for k in cells[f]}, key=lambda k: (ORDER + [k]).index(k))
    first = next(iter(cells[formats[0]].values()))
    fp = " / ".join(f"{t} {first['ppl_fp_texts'][t]['ppl']:.3f}" for t in texts)
    head = " | ".join(f"{f} {t}" for f in formats for t in (inside, outside))
    print(f"FP: {fp}\n\n| method | {head} | size MB |\n|---|" + "---|" * (2 * len(formats) + 1))
    for method in methods:
        row, sizes = [], []
        for f in formats:
            m = cells[f].get(method)
            for t in (inside, outside):
                row.append(f"{m['ppl_texts'][t]['ppl']:.3f} ({rise(m, t):+.1f}%)" if m else "-")
            if m:
                sizes.append(f"{m['size_mb']:.1f}")
        print(f"| {method} | " + " | ".join(row) + f" | {' / '.join(sizes)} |")

    print("\nOut-of-domain gain over RTN of the same format (percentage points; bar: at least half the in-domain "
          "gain):")
    for f in formats:
        for method, m in cells[f].items():
            if method in NOT_SOLVERS:
                continue
            base = cells[f].get("rtn-sym" if method.endswith("-sym") else "rtn")
            if base is None:
                continue
            gin, gout = rise(base, inside) - rise(m, inside), rise(base, outside) - rise(m, outside)
            ok = gout >= 0.5 * gin
            print(f"- {method} {f}: in domain {gin:+.1f}, out of domain {gout:+.1f} -> {'met' if ok else 'NOT met'}")

    hqq = cells.get("w4g64", {}).get("peer-hqq")
    for name in ("best-equal", "best-mixed"):
        best = cells.get("w4g64", {}).get(name)
        if best and hqq:
            ratio = rise(best, outside) / rise(hqq, outside)
            print(f"\n{name} ({best['size_mb']:.1f} MB) against HQQ ({hqq['size_mb']:.1f} MB) on {outside}: "
                  f"{rise(best, outside):+.1f}% vs {rise(hqq, outside):+.1f}%, {ratio:.2f}x -> "
                  f"{'met' if ratio <= 0.5 else 'NOT met'} (bar: at most 0.5x)")
    ours, peer = cells.get("w4g64", {}).get("gptq-default-sym"), cells.get("w4g64", {}).get("peer-gptqmodel-sym")
    if ours and peer and max(rise(peer, t) for t in (inside, outside)) > 1000:
        print("GPTQ defaults (sym) against GPTQModel's: no comparison, GPTQModel's model is broken "
              f"({inside} {peer['ppl_texts'][inside]['ppl']:.3g})")
    elif ours and peer:
        ok = all(rise(ours, t) <= rise(peer, t) for t in (inside, outside))
        print(f"GPTQ defaults (sym) against GPTQModel's: " + ", ".join(
            f"{t} {rise(ours, t):+.1f}% vs {rise(peer, t):+.1f}%" for t in (inside, outside))
            + f" -> {'met' if ok else 'NOT met'}")

if __name__ == "__main__":
    main()

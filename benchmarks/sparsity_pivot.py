"""PTSBench-style tables of the sparsity runs written by benchmarks/sparsity_table.sh.

    python benchmarks/sparsity_pivot.py runs/sparse

First a grid (a row per pruning method and allocation, a column per ratio or N:M pattern; WikiText-2 / LAMBADA
perplexity in each cell), then every run with its achieved sparsity, compression time and peak RSS. Run names
are the script's: [owl-|learned-]METHOD-(RATIO|NofM)[-gptq-w4], and shortgpt-PERCENT.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"^(?:(owl|learned)-)?(magnitude|wanda|sparsegpt|shortgpt)-(\d+|\dof\d)(-gptq-w4)?$")
COLUMNS = ["50", "60", "70", "80", "2of4", "4of8"]


def load(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*/metrics.json")):
        match = NAME.match(path.parent.name)
        if not match:
            continue
        alloc, method, shape, joint = match.groups()
        m = json.loads(path.read_text())
        texts = m.get("ppl_texts") or {"wikitext2": m["ppl"]}
        rows.append({"run": path.parent.name, "method": method + (" + GPTQ W4 g64" if joint else ""),
                     "alloc": alloc or "uniform", "shape": shape, "ppl": {k: v["ppl"] for k, v in texts.items()},
                     "fp": {k: v["ppl"] for k, v in (m.get("ppl_fp_texts") or {}).items()},
                     "sparsity": (m.get("sparsity") or {}).get("overall"), "time": m["quant_time_s"],
                     "rss": m["peak_rss_gb"], "size": m["size_mb"]})
    return rows


def label(shape: str) -> str:
    return shape.replace("of", ":") if "of" in shape else f"{shape}%"


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    wt, lam = row["ppl"].get("wikitext2"), row["ppl"].get("lambada")
    return f"{wt:.2f} / {lam:.2f}" if lam is not None else f"{wt:.2f}"


def main(folder: Path) -> None:
    rows = load(folder)
    if not rows:
        sys.exit(f"no sparsity runs in {folder}: run benchmarks/sparsity_table.sh {folder} first")
    fp = next((r["fp"] for r in rows if r["fp"]), {})
    print("FP: " + ", ".join(f"{k} {v:.3f}" for k, v in fp.items()) + "\n")
    by_key = {(r["method"], r["alloc"], r["shape"]): r for r in rows}
    print("| method | allocation | " + " | ".join(label(c) for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    keys = sorted({(r["method"], r["alloc"]) for r in rows if r["method"] != "shortgpt"},
                  key=lambda k: (["magnitude", "wanda", "sparsegpt"].index(k[0].split(" ")[0]), " " in k[0],
                                 ["uniform", "owl", "learned"].index(k[1])))
    for method, alloc in keys:
        print(f"| {method} | {alloc} | " + " | ".join(cell(by_key.get((method, alloc, c))) for c in COLUMNS) + " |")
    print("\n| run | WikiText-2 ppl | LAMBADA ppl | sparsity of the block linears | size MB | time s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{100 * r['sparsity']:.4f}%" if r["sparsity"] is not None else "-"
        lam = r["ppl"].get("lambada")
        print(f"| {r['run']} | {r['ppl']['wikitext2']:.3f} | {'-' if lam is None else f'{lam:.3f}'} | {sp} | "
              f"{r['size']:.1f} | {r['time']:.1f} | {r['rss']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sparse"))

"""The export table of docs/results.md from the folder benchmarks/export_table.sh wrote.

    python benchmarks/export_pivot.py runs/export

One row per exported (run, format): the run's formats (its metrics.json), whether the export carries the run's
own codes or re-fit them (the export's log says RE-FIT), then for each text `lowbit verify` scored (files
verify-RUN-FORMAT-TEXT.json): simulated and exported perplexity, their relative difference, the largest and mean
absolute logit difference and the top-1 agreement.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXTS = ("wikitext2", "lambada")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for path in sorted(out.glob("verify-*.json")):
        result = json.loads(path.read_text())
        run, export = Path(result["export"]).parent.name, Path(result["export"]).name.removesuffix(".gguf")
        text = path.stem.rsplit("-", 1)[1]
        rows.setdefault((run, export), {})[text] = result
    print("| run | weights | activations | export | codes | text | simulated ppl | exported ppl | Δ ppl "
          "| max abs Δlogit | mean abs Δlogit | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (run, export), by_text in rows.items():
        metrics = json.loads((out / run / "metrics.json").read_text())
        log = out / f"export-{run}-{export}.log"
        codes = "re-fit" if log.is_file() and "RE-FIT" in log.read_text() else "exact"
        for text in [t for t in TEXTS if t in by_text]:
            r = by_text[text]
            print(f"| {run} | {metrics['weights']} | {metrics['activations']} | {export} | {codes} | {text} "
                  f"| {r['ppl_a']:.3f} | {r['ppl_b']:.3f} | {100 * (r['ppl_b'] / r['ppl_a'] - 1):+.2f}% "
                  f"| {r['max_logit_diff']:.3f} | {r['mean_logit_diff']:.4f} | {100 * r['top1_agreement']:.2f}% |")


if __name__ == "__main__":
    main()

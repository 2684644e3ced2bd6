"""Where a compression run's time goes: one `lowbit run` of a recipe with timers around the pipeline's phases.

Usage: python benchmarks/time_split.py RECIPE [--set KEY=VALUE ...]
Prints one table: capturing the first block's inputs, the statistics forward passes (GPTQ's Hessian collection,
which stops at the block's last hooked linear), the Hessian products themselves, GPTQ's inverse-Hessian
factorization and its column loop, the propagation forward passes (quantized block on every window), the
diagnostics' FP forward passes (8 windows), checkpoint writing, and what is left (loading, saving, evaluation).
The timers wrap functions without changing what they compute; run it alone on the machine.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lowbit import blockio, context, pipeline, run
from lowbit.recipe import load_recipe
from lowbit.steps import gptq

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(owner, attr: str, label) -> None:
    """Replace owner.attr by a wrapper adding its wall time to `label` (a string, or a function of the args)."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = label(*args, **kwargs) if callable(label) else label
            spent[key] += time.perf_counter() - start
            calls[key] += 1
    setattr(owner, attr, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, a.set)

    def forward_label(ctx, x=None, batch_size=None):
        windows = ctx.q_inputs.shape[0] if x is None else x.shape[0]
        return "forward, propagation (all windows)" if x is None else f"forward, other ({windows} windows)"

    def collect(self, rels, fn, x=None, stop_early=False):  # split a statistics pass into forward and statistics
        def inner(rel, inp, out):
            start = time.perf_counter()
            fn(rel, inp, out)
            spent["statistics (Hessian products)"] += time.perf_counter() - start
        return original_collect(self, rels, inner, x, stop_early)

    original_collect = context.BlockContext.collect
    context.BlockContext.collect = collect
    timed(context.BlockContext, "collect", "forward, statistics pass (incl. statistics)")
    timed(context.BlockContext, "forward", forward_label)
    timed(pipeline, "capture_block_inputs", "capture first block inputs")
    timed(gptq, "robust_inverse_cholesky", "GPTQ inverse-Hessian factor")
    timed(gptq, "gptq_quantize", "GPTQ solve (incl. factor)")
    timed(blockio.BlockIO, "done", "checkpoint and block write")
    timed(run, "compress", "compress (total)")
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        run.run_recipe(recipe, Path(d) / "run", progress=False)
        total = time.perf_counter() - start
    spent["forward, statistics pass (incl. statistics)"] -= spent["statistics (Hessian products)"]
    spent["GPTQ solve (incl. factor)"] -= spent["GPTQ inverse-Hessian factor"]
    rows = [(k.replace(" (incl. statistics)", "").replace(" (incl. factor)", " (column loop)"), v, calls[k])
            for k, v in spent.items() if k != "compress (total)"]
    compress_total = spent["compress (total)"]
    print(f"recipe {a.recipe} {' '.join(a.set)}")
    print("| phase | calls | s | share of compression |\n|---|---|---|---|")
    for name, s, n in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {n or ''} | {s:.1f} | {100 * s / compress_total:.1f}% |")
    other = compress_total - sum(s for _, s, _ in rows)
    print(f"| rest of compression (rounding, masks, bookkeeping) | | {other:.1f} | {100 * other / compress_total:.1f}% |")
    print(f"| **compression** | | **{compress_total:.1f}** | 100% |")
    print(f"| loading, evaluation, saving | | {total - compress_total:.1f} | |")


if __name__ == "__main__":
    main()

"""Layer-level comparison of the pruning criteria on the embedded model: relative output error
||(W - W_pruned) X||² / ||W X||² of each linear of one decoder block on real calibration inputs (the inputs of the
uncompressed model), for magnitude (per layer), Wanda (per row) and SparseGPT (per block of 128 columns, with
its weight update), at several patterns. Usage: python benchmarks/sparsity_layer_error.py [BLOCK] [THREADS]
(about half a minute and 1 GB on 2 cores; docs/results.md, "Sparsity")."""
from __future__ import annotations

import sys
import time

import torch

from lowbit.context import BlockContext, FormatPlan, ModelContext
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import capture_block_inputs
from lowbit.sparsity import Pattern, prune_mask
from lowbit.state import QuantState
from lowbit.steps.gptq import accumulate_hessians, gptq_quantize
from lowbit.steps.sparsegpt import ObsSelector
from lowbit.steps.wanda import wanda_score

PATTERNS = {"50%": (0.5, Pattern()), "70%": (0.7, Pattern()), "2:4": (0.5, Pattern(2, 4)), "4:8": (0.5, Pattern(4, 8))}


@torch.no_grad()
def main(block: int = 5, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 8, 256, 0)
    adapter = get_adapter(model)
    mctx = ModelContext(model, adapter, FormatPlan(), QuantState(), ids)
    inputs, args, kwargs = capture_block_inputs(model, adapter, ids)
    blocks = adapter.blocks(model)
    for i in range(block):
        inputs = BlockContext(mctx, i, blocks[i], inputs, args, kwargs).forward()
    ctx = BlockContext(mctx, block, blocks[block], inputs, args, kwargs)
    rels = list(ctx.linears())
    hessians = accumulate_hessians(ctx, [(r,) for r in rels])
    print(f"| linear (block {block}) | pattern | magnitude | Wanda | SparseGPT | SparseGPT s |")
    print("|---|---|---|---|---|---|")
    for rel in rels:
        h, w = hessians[rel], ctx.block.get_submodule(rel).weight.float()
        ref = torch.trace(w @ h @ w.T).item()
        err = lambda q: torch.trace((q - w) @ h @ (q - w).T).item() / ref  # noqa: E731
        for label, (ratio, pattern) in PATTERNS.items():
            mag = w.masked_fill(prune_mask(w.abs(), ratio, pattern, "layer"), 0)
            wan = w.masked_fill(prune_mask(wanda_score(w, h.diagonal()), ratio, pattern, "row"), 0)
            every = pattern.m if pattern.structured else 128
            start = time.perf_counter()
            sgpt, _, _ = gptq_quantize(w, h, None, mask=torch.zeros_like(w, dtype=torch.bool),
                                       select=ObsSelector(every, ratio, pattern, "layer"))
            seconds = time.perf_counter() - start
            print(f"| {rel} | {label} | {err(mag):.4f} | {err(wan):.4f} | {err(sgpt):.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

"""The arithmetic floor of GPTQ's calibration work: the time of its unavoidable kernels alone on this machine.

Usage: python benchmarks/arith_floor.py [--model smollm2-135m] [--windows 64] [--seq-len 512] [--batch 8]
       [--threads 2] [--dtype float32] [--repeat 5]

Every block needs two forward passes over all calibration windows (statistics up to the last linear's input,
then the compressed block's outputs for the next block) and the XᵀX products of every input group. This times,
for one batch, the matrix products of each linear (`F.linear`), the causal attention (`scaled_dot_product_attention`,
with the model's heads) and lowbit's Hessian sums (`UpperGram.add`, the strips it really uses), on random inputs
of the block's shapes, and scales them to all blocks and batches: no norms, activations, rotary embeddings,
copies, GPTQ solves or I/O. A tool doing the same work cannot take less time than this on this CPU.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lowbit.loading import load_skeleton
from lowbit.models import get_adapter
from lowbit.steps.gptq import UpperGram


def best_time(fn, repeat: int) -> float:
    """Fastest of `repeat` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    model, _ = load_skeleton(a.model, dtype)  # shapes only (meta device): the adapter names the linears and groups
    adapter, cfg = get_adapter(model), model.config
    linears = {rel: (lin.in_features, lin.out_features) for rel, lin in adapter.linears(adapter.blocks(model)[0]).items()}
    groups = adapter.input_groups()
    heads, hd = cfg.num_attention_heads, adapter.head_dim(model)
    tokens = a.batch * a.seq_len
    x = {rel: torch.randn(tokens, i, dtype=dtype) for rel, (i, _) in linears.items()}
    w = {rel: torch.randn(o, i, dtype=dtype) * 0.02 for rel, (i, o) in linears.items()}
    t = {rel: best_time(lambda rel=rel: F.linear(x[rel], w[rel]), a.repeat) for rel in linears}
    q = torch.randn(a.batch, heads, a.seq_len, hd, dtype=dtype)
    kk = torch.randn(a.batch, heads, a.seq_len, hd, dtype=dtype)  # (KV heads repeated, as the model computes)
    t_attn = best_time(lambda: F.scaled_dot_product_attention(q, kk, kk, is_causal=True), a.repeat)
    t_hess = 0.0
    for group in groups:  # one Hessian per group of linears sharing an input
        n = linears[group[0]][0]
        gram, xs = UpperGram(n), torch.randn(tokens, n)
        t_hess += best_time(lambda gram=gram, xs=xs: gram.add(xs), a.repeat)
    full = sum(t.values()) + t_attn
    stats = full - sum(t[rel] for rel in groups[-1])  # the statistics pass stops at the last group's input
    blocks = len(adapter.blocks(model))
    batches = a.windows // a.batch * blocks
    rows = [("propagation forward (linears + attention)", full), ("statistics forward (all but the last linears)", stats),
            ("Hessian sums (UpperGram.add, float32 products)", t_hess)]
    flops = 2 * tokens * sum(i * o for i, o in linears.values())
    print(f"{a.model}: {blocks} blocks, {a.windows} x {a.seq_len} windows in batches of {a.batch}, "
          f"{a.dtype}, {a.threads} threads; linears of one batch {flops / 1e9:.1f} GFLOP at "
          f"{flops / sum(t.values()) / 1e9:.0f} GFLOP/s")
    print("| kernel work | one batch s | whole run s |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.4f} | {s * batches:.1f} |")
    total = sum(s for _, s in rows) * batches
    print(f"| **floor** | | **{total:.1f}** |")


if __name__ == "__main__":
    main()

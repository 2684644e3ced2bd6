"""Float32 GEMM speed on this CPU: torch's default kernels (MKL on x86) against oneDNN (`lowbit.gemm`), on the
products of the embedded model's compression: each linear of a block on a 1024-token call, the Hessian
products XᵀX over a 4096-token batch, and one GPTQ lazy block update of the 1B shape's down_proj. Prints a markdown table (GFLOP/s, medians of repeated calls).

Usage: python benchmarks/cpu_gemm.py [--threads 2]      (run it alone on the machine)
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from lowbit import gemm


def median_s(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if gemm.backend() != "onednn":
        raise SystemExit("lowbit.gemm does not use oneDNN here (LOWBIT_CPU_GEMM=torch, or torch without it)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| product | shape (M x K -> N) | torch GFLOP/s | oneDNN GFLOP/s | ratio |\n|---|---|---|---|---|")
    cases = [("q/o_proj", 1024, 576, 576), ("k/v_proj", 1024, 576, 192), ("gate/up_proj", 1024, 576, 1536),
             ("down_proj", 1024, 1536, 576)]
    for name, m, k, n in cases:
        x, w = torch.randn(m, k), torch.randn(n, k)
        flops = 2 * m * k * n
        slow = median_s(lambda: F.linear(x, w), 30)
        fast = median_s(lambda: gemm.linear(x, w), 30)
        print(f"| {name} | {m} x {k} -> {n} | {flops / slow / 1e9:.0f} | {flops / fast / 1e9:.0f} | {slow / fast:.2f} |")
    for k in (576, 1536):
        x = torch.randn(4096, k)
        flops = 2 * 4096 * k * k
        slow = median_s(lambda: x.T @ x, 10)
        fast = median_s(lambda: (lambda xt: gemm.linear(xt, xt))(x.T.contiguous()), 10)  # as UpperGram.add
        print(f"| XᵀX | 4096 x {k} | {flops / slow / 1e9:.0f} | {flops / fast / 1e9:.0f} | {slow / fast:.2f} |")
    # GPTQ's lazy block update on the 1B shape's down_proj: 7168 remaining columns from 128 solved ones
    wt, u, err = torch.randn(7168, 2048), torch.randn(128, 7168), torch.randn(128, 2048)
    flops = 2 * 7168 * 2048 * 128
    slow = median_s(lambda: wt.addmm_(u.t(), err, alpha=-1), 10)
    fast = median_s(lambda: wt.sub_(gemm.linear(u.t(), err.t())), 10)
    print(f"| GPTQ update (Wᵀ -= Uᵀ E) | 7168 x 128 -> 2048 | {flops / slow / 1e9:.0f} | {flops / fast / 1e9:.0f} "
          f"| {slow / fast:.2f} |")


if __name__ == "__main__":
    main()

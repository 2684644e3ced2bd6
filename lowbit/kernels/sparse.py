"""What sparsity buys at run time, measured: a pruned linear as a CSR matrix (CPU) against the dense matmul, and
2:4 semi-structured (`torch.sparse.to_sparse_semi_structured`, NVIDIA GPUs with sparse tensor cores) where a GPU
exists. Each sparse layer is timed in rounds alternating with the dense one (so load drifts hit both alike);
times are the fastest of `repeats` calls after a warm-up call, as in `bench_layers`, and each ratio is to the
dense layer's time from the same rounds."""
from __future__ import annotations

import time
import warnings

import torch

from lowbit.sparsity import Pattern, prune_mask


def _paired_ms(dense, sparse, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """Fastest call of each of two functions, timed alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (dense, sparse):
        fn()
    sync()
    for _ in range(repeats):
        for fn, out in zip((dense, sparse), times):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return min(times[0]) * 1e3, min(times[1]) * 1e3


@torch.inference_mode()
def bench_sparse(out_features: int = 1536, in_features: int = 576, rows: tuple[int, ...] = (1, 128),
                 ratios: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9), repeats: int = 20,
                 threads: int = 1) -> list[dict]:
    """ms per call of y = x Wᵀ with W dense (float32) and W in CSR at each unstructured ratio (magnitude mask);
    then, on a CUDA device, float16 dense against 2:4 semi-structured."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features)
    results = []
    for ratio in ratios:
        with warnings.catch_warnings():  # "CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            sparse = w.masked_fill(prune_mask(w.abs(), ratio, Pattern(), "row"), 0).to_sparse_csr()
        nbytes = sum(t.numel() * t.element_size() for t in (sparse.values(), sparse.col_indices(),
                                                           sparse.crow_indices()))
        row = {"layer": f"CSR float32 {ratio:.0%} unstructured (CPU)", "bytes": nbytes, "dense_bytes": w.numel() * 4}
        for m in rows:
            x = torch.randn(m, in_features)
            row[f"dense_ms_{m}"], row[f"ms_{m}"] = _paired_ms(lambda: x @ w.T, lambda: (sparse @ x.T).T, repeats)
        results.append(row)
    if torch.cuda.is_available():
        results += _bench_semi_structured(w, rows, repeats)
    return results


def _bench_semi_structured(w: torch.Tensor, rows: tuple[int, ...], repeats: int) -> list[dict]:
    """float16 dense vs 2:4 semi-structured on the GPU (rows padded to the kernel's minimum of 32 where needed)."""
    from torch.sparse import to_sparse_semi_structured

    dense = w.masked_fill(prune_mask(w.abs(), 0.5, Pattern(2, 4)), 0).half().cuda()
    packed = to_sparse_semi_structured(dense)
    sync = torch.cuda.synchronize
    row = {"layer": "2:4 semi-structured float16 (GPU)", "bytes": dense.numel() + dense.numel() // 8,
           "dense_bytes": dense.numel() * 2}
    for m in rows:
        x = torch.randn(w.shape[1], max(m, 32), dtype=torch.float16, device="cuda")
        row[f"dense_ms_{m}"], row[f"ms_{m}"] = _paired_ms(lambda: torch.mm(dense, x), lambda: torch.mm(packed, x),
                                                          repeats, sync)
    return [row]


def sparse_table(rows: list[dict]) -> str:
    """Markdown table of `bench_sparse`: ms per call (and as a multiple of the paired dense call), weight bytes."""
    counts = [k.removeprefix("ms_") for k in rows[0] if k.startswith("ms_")]
    lines = ["| layer | weight KB (dense) | " + " | ".join(f"ms, {m} rows (x dense)" for m in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for r in rows:
        cells = [f"{r['ms_' + m]:.3f} ({r['ms_' + m] / r['dense_ms_' + m]:.2f})" for m in counts]
        lines.append(f"| {r['layer']} | {r['bytes'] / 1024:.0f} ({r['dense_bytes'] / 1024:.0f}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)

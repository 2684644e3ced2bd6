"""What sparsity buys at run time, measured: a pruned linear as a CSR matrix (CPU) against the dense matmul, and
2:4 semi-structured (`torch.sparse.to_sparse_semi_structured`, NVIDIA GPUs with sparse tensor cores) where a GPU
exists. Times are the fastest of `repeats` calls after a warm-up call, as in `bench_layers`."""
from __future__ import annotations

import time
import warnings

import torch

from lowbit.sparsity import Pattern, prune_mask


def _best_ms(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


@torch.inference_mode()
def bench_sparse(out_features: int = 1536, in_features: int = 576, rows: tuple[int, ...] = (1, 128),
                 ratios: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9), repeats: int = 20,
                 threads: int = 1) -> list[dict]:
    """ms per call of y = x Wᵀ with W dense (float32) and W in CSR at each unstructured ratio (magnitude mask);
    then, on a CUDA device, float16 dense against 2:4 semi-structured."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features)
    results = [{"layer": "dense float32 (CPU)", "bytes": w.numel() * 4,
                **{f"ms_{m}": _best_ms(lambda x=torch.randn(m, in_features): x @ w.T, repeats) for m in rows}}]
    for ratio in ratios:
        with warnings.catch_warnings():  # "CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            sparse = w.masked_fill(prune_mask(w.abs(), ratio, Pattern(), "row"), 0).to_sparse_csr()
        nbytes = sum(t.numel() * t.element_size() for t in (sparse.values(), sparse.col_indices(),
                                                           sparse.crow_indices()))
        results.append({"layer": f"CSR float32 {ratio:.0%} unstructured (CPU)", "bytes": nbytes,
                        **{f"ms_{m}": _best_ms(lambda x=torch.randn(m, in_features): (sparse @ x.T).T, repeats)
                           for m in rows}})
    if torch.cuda.is_available():
        results += _bench_semi_structured(w, rows, repeats)
    return results


def _bench_semi_structured(w: torch.Tensor, rows: tuple[int, ...], repeats: int) -> list[dict]:
    """float16 dense vs 2:4 semi-structured on the GPU (rows padded to the kernel's minimum of 32 where needed)."""
    from torch.sparse import to_sparse_semi_structured

    dense = w.masked_fill(prune_mask(w.abs(), 0.5, Pattern(2, 4)), 0).half().cuda()
    packed = to_sparse_semi_structured(dense)
    sync = torch.cuda.synchronize
    out = []
    for name, weight, nbytes in (("dense float16 (GPU)", dense, dense.numel() * 2),
                                 ("2:4 semi-structured float16 (GPU)", packed, dense.numel() * 2 // 2 + dense.numel() // 8)):
        row = {"layer": name, "bytes": nbytes}
        for m in rows:
            x = torch.randn(max(m, 32), w.shape[1], dtype=torch.float16, device="cuda")
            row[f"ms_{m}"] = _best_ms(lambda x=x, weight=weight: torch.mm(weight, x.T), repeats, sync)
        out.append(row)
    return out


def sparse_table(rows: list[dict]) -> str:
    """Markdown table of `bench_sparse`: ms per call and ratio to the dense row of the same device, weight bytes."""
    counts = [k.removeprefix("ms_") for k in rows[0] if k.startswith("ms_")]
    lines = ["| layer | weight KB | " + " | ".join(f"ms, {m} rows (x dense)" for m in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    base = rows[0]
    for r in rows:
        if r["layer"].startswith("dense"):
            base = r
        cells = [f"{r['ms_' + m]:.3f} ({r['ms_' + m] / base['ms_' + m]:.2f})" for m in counts]
        lines.append(f"| {r['layer']} | {r['bytes'] / 1024:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Range estimation: choose quantization parameters for a tensor by min-max, MSE clipping search, or percentile."""
from __future__ import annotations

from typing import Literal

import torch

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, global_scale, group_view, params_shape, qparams_from_range
from lowbit.gguf_types import block_params, grid_type

Observer = Literal["minmax", "mse", "percentile"]


def observe(x: torch.Tensor, spec: QuantSpec, method: Observer = "minmax", *, grid: int = 100,
            max_shrink: float = 0.8, norm: float = 2.4, percentile: float = 99.99,
            gs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for `x` under `spec`, shaped like `params_shape(x, spec)`.

    `gs`: NVFP4's per-tensor scale when it is shared with other tensors (fused q/k/v); default from `x` itself.

    mse: per group, shrink the min-max range by factors 1 .. 1-max_shrink and keep the one with the
    lowest |x - Q(x)|^norm (the search used by GPTQ/AWQ-style clipping). percentile: clip to the
    given percentile of |x| per group (of x's low and high tails for asymmetric formats).
    """
    g = group_view(x.detach().float(), spec)
    if gs is None and spec.scale_format == "e4m3":  # (only NVFP4 has a per-tensor scale)
        gs = global_scale(g.abs().max(), spec)
    if method == "minmax":
        lo, hi = g.amin(-1), g.amax(-1)
    elif method == "percentile":
        if not 0 < percentile <= 100:
            raise LowbitError(f"percentile must be in (0, 100], got {percentile}")
        n = g.shape[-1]
        k_hi = max(1, min(n, round(percentile / 100 * n)))
        lo = g.kthvalue(n + 1 - k_hi, dim=-1).values
        hi = g.kthvalue(k_hi, dim=-1).values
    elif method == "mse":
        lo, hi = _mse_range(g, spec, grid, max_shrink, norm, gs)
    else:
        raise LowbitError(f"unknown observer {method!r}: use minmax, mse or percentile")
    shape = params_shape(x, spec)
    if spec.gguf is not None and spec.granularity == "group":
        return block_params(lo.reshape(shape), hi.reshape(shape), grid_type(spec))
    scale, zero = qparams_from_range(lo, hi, spec, gs)
    return scale.reshape(shape), zero.reshape(shape)


def _mse_range(g: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float, norm: float, gs: torch.Tensor | None):
    """Grid search over a shrink factor of the range, per row of `g`, minimizing the Lp quantization error."""
    lo0, hi0 = g.amin(-1), g.amax(-1)
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    row_spec = spec.row_spec()
    # integer grids: fake_quant's operations in one reused buffer (same values, a third of the time)
    buf = torch.empty_like(g) if row_spec.format != "fp" and row_spec.gguf is None else None
    for i in range(int(max_shrink * grid) + 1):
        p = 1 - i / grid
        lo, hi = lo0 * p, hi0 * p
        scale, zero = qparams_from_range(lo, hi, row_spec, gs)
        s, z = scale[:, None], zero[:, None]
        if buf is None:
            err = (fake_quant(g, s, z, row_spec) - g).abs().pow(norm).sum(-1)
        else:
            torch.div(g, s, out=buf).round_().add_(z).clamp_(row_spec.qmin, row_spec.qmax)
            err = buf.sub_(z).mul_(s).sub_(g).abs_().pow_(norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi

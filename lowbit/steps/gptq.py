"""GPTQ: quantize weights column by column, folding each column's rounding error into the columns not yet
quantized through the inverse Hessian of the layer's calibration inputs (H = 2 X Xᵀ / N)."""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from lowbit.context import BlockContext
from lowbit.formats import QuantSpec, fake_quant, params_shape
from lowbit.observers import observe
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class GPTQArgs(StepArgs):
    damp: float = Field(0.01, ge=0)  # added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = Field(128, gt=0)  # columns updated lazily together
    act_order: bool = False  # quantize columns by decreasing H_ii (group parameters stay static)
    static_groups: bool = False  # group parameters from the original weights (always on with act_order)
    true_sequential: bool = False  # re-collect inputs after each group of linears is quantized (1.4x slower)
    observer: Literal["minmax", "mse", "percentile"] | None = None  # default: the weights spec's observer


def robust_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).

    If H is not positive definite at that damping (e.g. damp=0 on rank-deficient inputs), the damping is
    raised tenfold (starting at 1e-4) until the factorization succeeds; the value used is logged.
    """
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    tries = [damp] + [max(damp, 1e-4) * 10 ** k for k in range(8)]
    for i, d in enumerate(tries):
        chol, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0 and torch.isfinite(upper).all():
                if i:
                    log.warning("GPTQ: Hessian not positive definite at damp=%g, used damp=%g", damp, d)
                return upper
    raise AssertionError("Cholesky failed even with damp=1e3; the Hessian is not finite")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, observer: str = "minmax", damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `w` [out, in] given the Hessian `h` [in, in] of its inputs; returns (dequantized w, scale, zero).

    Scale and zero are shaped like `params_shape(w, spec)`. Columns with H_ii = 0 never see any input:
    they are set to zero. Per-channel and per-tensor parameters come from the whole (original) weight;
    per-group parameters from each group's columns as they are reached, or from the original weight if
    `static_groups` (forced by `act_order`, so groups stay contiguous in the original column order).
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    col_spec = spec.with_(granularity="channel", group_size=None)
    grouped = spec.granularity == "group"
    static = not grouped or static_groups or act_order
    if static:
        scale, zero = observe(w, spec, observer)
        if spec.granularity == "tensor":
            row_scale, row_zero = scale.expand(rows, 1), zero.expand(rows, 1)
        else:
            row_scale, row_zero = scale.reshape(rows, -1), zero.reshape(rows, -1)
    else:
        row_scale = torch.empty(rows, cols // spec.group_size)
        row_zero = torch.empty_like(row_scale)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    group_of = perm // spec.group_size if grouped else torch.zeros(cols, dtype=torch.long)
    u = robust_inverse_cholesky(h, damp)
    q = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % spec.group_size == 0:
                chunk = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :spec.group_size]
                s, z = observe(chunk, col_spec, observer)
                row_scale[:, c // spec.group_size], row_zero[:, c // spec.group_size] = s[:, 0], z[:, 0]
            g = group_of[c]
            col = w1[:, i]
            qc = _round_column(col, row_scale[:, g], row_zero[:, g], col_spec)
            q[:, c] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    if static:
        return q, scale, zero
    shape = params_shape(q, spec)
    return q, row_scale.reshape(shape), row_zero.reshape(shape)


def _round_column(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize one weight column with per-row parameters (inlined for integers: this is the hot loop)."""
    if spec.format == "fp":
        return fake_quant(col[:, None], scale[:, None], zero[:, None], spec)[:, 0]
    return (torch.clamp(torch.round(col / scale) + zero, spec.qmin, spec.qmax) - zero) * scale


def accumulate_hessians(ctx: BlockContext, groups: list[tuple[str, ...]],
                        x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / N for each group's shared input (N = number of tokens), summed in float64, over the block
    inputs `x` (default: the quantized-path calibration inputs)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(rel: str, x: torch.Tensor, _out: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        sums[rel] = sums[rel] + xtx if rel in sums else xtx
        counts[rel] = counts.get(rel, 0) + x.shape[0]

    ctx.collect([g[0] for g in groups], add, x=x, stop_early=True)
    return {g[0]: (2 * sums[g[0]] / counts[g[0]]).float() for g in groups}


@register_step
class GPTQ(Step):
    """Second-order error compensation (Frantar et al., 2022), one Hessian per group of linears sharing an input.

    By default all Hessians come from one pass over the block before any of it is quantized (as llm-compressor
    does); `true_sequential` quantizes q/k/v first, then collects o_proj's inputs through the quantized q/k/v,
    and so on: one more partial block forward per group, for no measured gain on the embedded model.
    """

    name = "gptq"
    Args = GPTQArgs
    solves_weights = True

    def on_block(self, ctx: BlockContext) -> None:
        groups = [tuple(todo) for todo in map(ctx.pending, ctx.adapter.input_groups()) if todo]
        if not groups:
            return
        if self.args.true_sequential:
            for group in groups:
                self._quantize_group(ctx, group, accumulate_hessians(ctx, [group])[group[0]])
        else:
            hessians = accumulate_hessians(ctx, groups)
            for group in groups:
                self._quantize_group(ctx, group, hessians[group[0]])

    def _quantize_group(self, ctx: BlockContext, group: tuple[str, ...], h: torch.Tensor) -> None:
        """Linears sharing an input and a per-row format are stacked and solved as one matrix."""
        a = self.args
        observer = a.observer or ctx.plan.weight_observer
        batches: dict[QuantSpec, list[str]] = {}
        for rel in group:
            spec = ctx.weight_spec(rel)
            key = spec if spec.granularity != "tensor" else (spec, rel)
            batches.setdefault(key, []).append(rel)
        for rels in batches.values():
            spec = ctx.weight_spec(rels[0])
            weights = [ctx.block.get_submodule(r).weight.data for r in rels]
            q, scale, zero = gptq_quantize(torch.cat(weights), h, spec, observer, a.damp, a.block_size,
                                           a.act_order, a.static_groups)
            start = 0
            for rel, weight in zip(rels, weights):
                end = start + weight.shape[0]
                s, z = (scale, zero) if spec.granularity == "tensor" else (scale[start:end], zero[start:end])
                ctx.set_quantized_weight(rel, q[start:end], spec, s, z)
                start = end

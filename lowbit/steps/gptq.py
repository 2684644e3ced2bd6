"""GPTQ: quantize weights column by column, folding each column's rounding error into the columns not yet
quantized through the inverse Hessian of the layer's calibration inputs (H = 2 X Xᵀ / N)."""
from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch
from pydantic import Field

from lowbit import distributed, gemm
from lowbit.context import BlockContext
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, global_scale, params_shape
from lowbit.observers import observe
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class Selector(Protocol):
    """Chooses which weights to prune every `every` columns, from the compensated weights and the inverse
    Hessian's Cholesky diagonal of those columns; returns their mask (True = prune)."""

    every: int

    def __call__(self, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor: ...


class GPTQArgs(StepArgs):
    # added to H's diagonal, as a fraction of its mean diagonal; 0.05 (GPTQModel's) generalizes better out of
    # domain than 0.01 (docs/results.md, "Quality outside the calibration text")
    damp: float = Field(0.05, ge=0)
    # added to each H_ii as a fraction of itself: shrinks H towards its diagonal, so the solver leans less on the
    # correlations between input channels of a few calibration windows and keeps weighting channels by their
    # energy; 1.0 beats 0 in and out of domain (docs/results.md, "Quality outside the calibration text")
    diag_damp: float = Field(1.0, ge=0)
    block_size: int = Field(128, gt=0)  # columns updated lazily together
    # quantize columns by decreasing H_ii: true (group parameters static, from the original weights) or group
    # (groups ordered by their largest H_ii and kept contiguous, each group's parameters from its compensated
    # weights when reached: GPTQModel's group-aware order); true beats group in and out of domain
    # (docs/results.md, "Quality outside the calibration text")
    act_order: bool | Literal["group"] = True
    static_groups: bool = False  # group parameters from the original weights (always on with act_order)
    true_sequential: bool = False  # re-collect inputs after each group of linears is quantized (1.4x slower)
    # each group's range: mse (the shrink with the least error) beats min-max in and out of domain, symmetric or
    # not (docs/results.md, "Quality outside the calibration text"); None: the weights spec's observer
    observer: Literal["minmax", "mse", "percentile"] | None = "mse"


def inverse_cholesky_upper(h: torch.Tensor, order: torch.Tensor | None = None,
                           diagonal: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Upper triangular U with UᵀU = H'⁻¹ (and positive diagonal), and LAPACK's info (0: H' positive definite),
    for H' = H[order][:, order] (default: H) with its diagonal replaced by `diagonal` (given in that order: damping).

    With J the reversal permutation and J H' J = L Lᵀ, H' = R Rᵀ for the upper triangular R = J L J, so
    H'⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky factorization and one triangular inverse, never H'⁻¹
    itself (the usual cholesky → cholesky_inverse → cholesky costs twice as much and forms the explicit inverse).
    Two matrices beside `h`: J H' J is gathered in one copy and overwritten by L, L⁻¹ overwrites the identity
    (LAPACK works in place), and J L⁻¹ J is L⁻¹ reversed in place.
    """
    factor, info = _reversed_cholesky(h, order, diagonal)
    return (factor, info) if info else (_reversed_inverse(factor), 0)


def _reversed_cholesky(h: torch.Tensor, order: torch.Tensor | None,
                       diagonal: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """L with J H' J = L Lᵀ (H' as in `inverse_cholesky_upper`), computed in one gathered copy, and LAPACK's info."""
    rev = (torch.arange(h.shape[0], device=h.device) if order is None else order).flip(0)
    factor = _gathered(h, rev).t()  # column-major, as LAPACK works: no hidden copies
    if diagonal is not None:
        factor.diagonal().copy_(diagonal.flip(0))
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    return factor, int(info)


def _gathered(h: torch.Tensor, idx: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """hᵀ[idx][:, idx], gathered `rows` rows at a time: one copy of `h` plus a strip (two index_selects per strip
    are twice as fast as one two-dimensional advanced index)."""
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    for a in range(0, len(idx), rows):
        torch.index_select(h.index_select(1, idx[a:a + rows]).t(), 1, idx, out=out[a:a + rows])
    return out


def _reversed_inverse(factor: torch.Tensor) -> torch.Tensor:
    """J L⁻¹ J from L (which is freed): L⁻¹ overwrites an identity, then is reversed in place."""
    inv = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device).t()
    torch.linalg.solve_triangular(factor, inv, upper=False, out=inv)
    factor.untyped_storage().resize_(0)
    return _reverse_(inv)


def _reverse_(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Matrix `t` flipped on both axes in place: the order of its elements in memory reversed (row- or
    column-major)."""
    flat = _flat(t)
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        j = min(i + chunk, n // 2)
        low = flat[i:j].clone()
        flat[i:j] = flat[n - j:n - i].flip(0)
        flat[n - j:n - i] = low.flip(0)
    return t


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A row- or column-major matrix's storage as one vector (a view)."""
    return (t if t.is_contiguous() else t.t()).view(-1)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`: its smallest and largest elements are finite (NaN propagates through both); one
    pass without allocating, a tenth of the time of isfinite().all() on a 1536-wide factor."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def robust_inverse_cholesky(h: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                            diagonal: torch.Tensor | None = None, consume: bool = False,
                            diag_damp: float = 0.0) -> torch.Tensor:
    """Upper Cholesky factor of (H' + diag_damp · diag H' + λI)⁻¹ with λ = damp · mean(diag H'), H' as in
    `inverse_cholesky_upper`
    (`h` itself is not changed; with `consume` its memory is freed once factored, before the inverse is formed).

    If H' is not positive definite at that damping (e.g. damp=0 on rank-deficient inputs), the damping is
    raised tenfold (starting at 1e-4) until the factorization succeeds; the value used is logged.
    """
    diagonal = (h.diagonal() if order is None else h.diagonal()[order]) if diagonal is None else diagonal
    diagonal = diagonal.clone() if consume else diagonal
    mean_diag = _strided_mean(diagonal).clamp_min(1e-12)
    if diag_damp:
        diagonal = diagonal * (1 + diag_damp)
    tries = [damp] + [max(damp, 1e-4) * 10 ** k for k in range(8)]
    for i, d in enumerate(tries):
        factor, info = _reversed_cholesky(h, order, diagonal + d * mean_diag)
        if info:
            del factor  # (before the next try gathers another)
            continue
        if consume:
            h.untyped_storage().resize_(0)
        upper = _reversed_inverse(factor)  # (frees the factor)
        if _all_finite(upper):
            if i:
                log.warning("GPTQ: Hessian not positive definite at damp=%g, used damp=%g", damp, d)
            return upper
        if consume:
            raise LowbitError(f"GPTQ: the factor of the inverse Hessian overflowed at damp={d:g}: raise gptq.damp")
        del upper
    raise AssertionError("Cholesky failed even with damp=1e3; the Hessian is not finite")


def _strided_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of a vector summed as torch sums a strided view such as a matrix's diagonal (how H's mean diagonal
    was always taken; a contiguous vector is summed in another order, which moves the damping by an ulp)."""
    buf = v.new_empty(2 * v.numel())
    buf[::2] = v
    return buf[::2].mean()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec | None, observer: str = "minmax",
                  damp: float = 0.01, block_size: int = 128, act_order: bool | str = False,
                  static_groups: bool = False,
                  gs: torch.Tensor | None = None, mask: torch.Tensor | None = None, select: Selector | None = None,
                  consume_h: bool = False, diag_damp: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Quantize `w` [out, in] given the Hessian `h` [in, in] of its inputs; returns (dequantized w, scale, zero).

    Scale and zero are shaped like `params_shape(w, spec)`. Columns with H_ii = 0 never see any input:
    they are set to zero. Per-channel and per-tensor parameters come from the whole (original) weight;
    per-group parameters from each group's columns as they are reached, or from the original weight if
    `static_groups` (forced by `act_order=True`, whose column order splits groups; `act_order="group"` keeps
    them whole, see `group_order`); 2-D blocks always from the original weight. `gs`: NVFP4's per-tensor scale (shared across fused linears).

    Sparsity (SparseGPT, Frantar & Alistarh 2023): weights where `mask` [out, in] is True become exactly zero
    and their error is compensated like a rounding error. `select` fills `mask` in place as columns are
    reached, from the compensated weights (adaptive mask selection). `spec` None prunes without quantizing.

    The column loop works on the transposed weight (one contiguous row per column) with preallocated buffers:
    it is a Python loop of small operations, so their count and memory layout set its speed. `consume_h`: the
    caller is done with `h`; its memory is freed once H⁻¹'s factor is computed (the tensor is left empty).
    """
    w = w.detach().to(torch.float32, copy=True)
    h = h.detach().float()  # (never written)
    rows, cols = w.shape
    if select is not None and (act_order or block_size % select.every):
        raise LowbitError(f"mask selection every {select.every} columns needs act_order off and a block_size that "
                          f"is a multiple of {select.every}")
    diag = h.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1
    w[:, dead] = 0
    if mask is not None:
        w.masked_fill_(mask, 0)
    grouped = spec is not None and spec.granularity in ("group", "block")
    by_group = act_order == "group" and spec is not None and spec.granularity == "group" and spec.gguf is None
    full_order = bool(act_order) and not by_group
    static = spec is None or spec.granularity != "group" or static_groups or full_order or spec.gguf is not None
    scale = zero = None
    perm = (group_order(diag, spec.group_size) if by_group else
            torch.argsort(diag, descending=True) if full_order else torch.arange(cols))
    group_of = perm // (spec.block[1] if spec.granularity == "block" else spec.group_size) if grouped \
        else torch.zeros(cols, dtype=torch.long)
    if spec is not None:
        if gs is None and spec.scale_format == "e4m3":  # every group's FP8 scale under the same tensor scale
            gs = global_scale(w.abs().max(), spec)
        col_spec = spec.row_spec()
        if static:
            scale, zero = observe(w, spec, observer, gs=gs)
            if spec.granularity == "tensor":
                row_scale, row_zero = scale.expand(rows, 1), zero.expand(rows, 1)
            elif spec.granularity == "block":  # one row of block scales per weight row
                row_scale = scale.repeat_interleave(spec.block[0], 0)[:rows]
                row_zero = zero.repeat_interleave(spec.block[0], 0)[:rows]
            else:
                row_scale, row_zero = scale.reshape(rows, -1), zero.reshape(rows, -1)
            # [groups, rows]: one contiguous row of parameters per group
            group_scale, group_zero = row_scale.t().contiguous(), row_zero.t().contiguous()
        else:
            group_scale = torch.empty(cols // spec.group_size, rows)
            group_zero = torch.empty_like(group_scale)
    pmask = None if mask is None else mask.t()[perm] if act_order else mask.t()  # views of `mask`: select writes it
    u = robust_inverse_cholesky(h, damp, perm, diag[perm], consume_h, diag_damp)  # in solving order (H never copied whole)
    del h
    wt = w.t().index_select(0, perm)  # [cols, rows] in solving order
    del w
    qt = torch.empty_like(wt)
    groups = group_of.tolist()
    # the loop's views made once, in single calls: per column, only its few arithmetic operations remain
    w_cols, q_cols = wt.unbind(0), qt.unbind(0)
    if spec is not None:
        g_scale, g_zero = group_scale.unbind(0), group_zero.unbind(0)
        # static integer groups: clamp(round(w/s) + z, qmin, qmax) - z is exactly clamp(round(w/s), qmin - z,
        # qmax - z) (small integers in float32), two operations fewer per column
        clamped = static and spec.format == "int" and not spec.gguf
        if clamped:
            g_lo = (spec.qmin - group_zero).unbind(0)
            g_hi = (spec.qmax - group_zero).unbind(0)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        errs, u_rows, u_diag = err.unbind(0), u1.unbind(0), u1.diagonal().unbind(0)
        for i in range(i2 - i1):
            c = i1 + i
            if select is not None and i % select.every == 0:
                n = min(select.every, i2 - c)
                pmask[c:c + n] = select(w1[i:i + n].t(), u1.diagonal()[i:i + n]).t()
            if not static and c % spec.group_size == 0:
                chunk = torch.cat([w1[i:], wt[i2:]])[:spec.group_size].t()
                if pmask is not None:
                    chunk = chunk.masked_fill(pmask[c:c + spec.group_size].t(), 0)
                s, z = observe(chunk, col_spec, observer, gs=gs)
                group_scale[groups[c]], group_zero[groups[c]] = s[:, 0], z[:, 0]
            col, qc = w_cols[c], q_cols[c]
            if spec is None:
                qc.copy_(col)
            elif clamped:
                g = groups[c]
                torch.div(col, g_scale[g], out=qc).round_().clamp_(g_lo[g], g_hi[g]).mul_(g_scale[g])
            else:
                _round_column(col, g_scale[groups[c]], g_zero[groups[c]], col_spec, out=qc)
            if pmask is not None:
                qc.masked_fill_(pmask[c], 0)
            e = torch.sub(col, qc, out=errs[i]).div_(u_diag[i])
            w1[i + 1:].addr_(u_rows[i][i + 1:], e, alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    # (views included) the factor and the work copy, freed before the reorder
    u = wt = u1 = w1 = col = e = err = errs = u_rows = u_diag = w_cols = None
    q = qt.index_select(0, torch.argsort(perm)).t().contiguous()
    if static:
        return q, scale, zero
    shape = params_shape(q, spec)
    return q, group_scale.t().reshape(shape), group_zero.t().reshape(shape)


def group_order(diag: torch.Tensor, width: int) -> torch.Tensor:
    """Column order that visits whole groups of `width`: groups by their largest H_ii, columns within a group by
    H_ii, both decreasing (the most sensitive columns early, as act-order, without splitting a group)."""
    per_group = diag.reshape(-1, width)
    groups = torch.argsort(per_group.max(dim=1).values, descending=True)
    within = torch.argsort(per_group, dim=1, descending=True)
    return (within[groups] + groups[:, None] * width).reshape(-1)


def _round_column(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                  out: torch.Tensor) -> torch.Tensor:
    """Fake-quantize one weight column with per-row parameters into `out` (inlined, in place, for integers: this
    is the hot loop)."""
    if spec.format == "fp":
        return out.copy_(fake_quant(col[:, None], scale[:, None], zero[:, None], spec)[:, 0])
    if spec.gguf:  # GGUF: real zeros, inside the rounding
        torch.div(col, scale, out=out).add_(zero).round_()
    else:
        torch.div(col, scale, out=out).round_().add_(zero)
    return out.clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)


def accumulate_hessians(ctx: BlockContext, groups: list[tuple[str, ...]],
                        x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / N for each group's shared input (N = number of tokens), summed in float64 over the block
    inputs `x` (default: the quantized-path calibration inputs) and over ranks."""
    sums: dict[str, UpperGram] = {}

    def add(rel: str, x: torch.Tensor, _out: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sums.setdefault(rel, UpperGram(x.shape[1], x.device)).add(x)

    ctx.collect([g[0] for g in groups], add, x=x, stop_early=True)
    out = {}
    for g in groups:  # summed over ranks (a rank without windows adds zeros), then normalized once
        w = ctx.block.get_submodule(g[0]).weight
        gram = sums.pop(g[0], None) or UpperGram(w.shape[1], w.device)
        gram.reduce()
        out[g[0]] = gram.matrix(2, distributed.reduce_float(gram.count))
    return out


class UpperGram:
    """XᵀX summed over batches in float64, on and above the diagonal only, as strips of rows (below the diagonal
    only inside each strip's diagonal tile): about half the products of a full XᵀX (BLAS's syrk, which torch does
    not expose) and, with 8 strips, 56% of its memory (a 14336-wide float64 sum: 0.9 GB instead of 1.6 GB)."""

    def __init__(self, n: int, device: torch.device | str = "cpu", strip: int = 128):
        strip = max(strip, -(-n // 8))
        self.n, self.count = n, 0
        self.strips = [torch.zeros(min(a + strip, n) - a, n - a, dtype=torch.float64, device=device)
                       for a in range(0, n, strip)]

    def add(self, x: torch.Tensor) -> None:
        """Add XᵀX of `x` [tokens, n] (through `lowbit.gemm`: oneDNN reads Xᵀ's rows faster made contiguous)."""
        xt = x.T.contiguous() if gemm.applies(x) else x.T
        a = 0
        for s in self.strips:
            s.add_(gemm.linear(xt[a:a + s.shape[0]], xt[a:]))  # (float32 products added in float64)
            a += s.shape[0]
        self.count += x.shape[0]

    def reduce(self) -> None:
        """Sum over ranks (a no-op in one process)."""
        self.strips = [distributed.reduce(s) for s in self.strips]

    def matrix(self, mul: float, div: float) -> torch.Tensor:
        """The symmetric float32 matrix XᵀX · mul / div (scaled in float64, then rounded), strip by strip; the
        float64 strips are freed as they are read."""
        out = torch.empty(self.n, self.n, dtype=torch.float32, device=self.strips[0].device if self.strips else "cpu")
        a = 0
        while self.strips:
            s = self.strips.pop(0)
            b = a + s.shape[0]
            out[a:b, a:] = (s * mul / div).float()
            del s
            out[a:b, :a] = out[:a, a:b].T
            tile = out[a:b, a:b]
            tile.copy_(tile.triu() + tile.triu(1).T)
            a = b
        return out


@register_step
class GPTQ(Step):
    """Second-order error compensation (Frantar et al., 2022), one Hessian per group of linears sharing an input.

    By default all Hessians come from one pass over the block before any of it is quantized (as llm-compressor
    does); `true_sequential` quantizes q/k/v first, then collects o_proj's inputs through the quantized q/k/v,
    and so on: one more partial block forward per group (docs/results.md compares both).
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
            for group in groups:  # each Hessian freed once its group is solved
                self._quantize_group(ctx, group, hessians.pop(group[0]))

    def _quantize_group(self, ctx: BlockContext, group: tuple[str, ...], h: torch.Tensor) -> None:
        """Linears sharing an input and a per-row format are stacked and solved as one matrix."""
        a = self.args
        observer = a.observer or ctx.plan.weight_observer
        batches: dict[QuantSpec, list[str]] = {}
        for rel in group:
            spec = ctx.weight_spec(rel)
            key = spec if spec.granularity not in ("tensor", "block") else (spec, rel)
            batches.setdefault(key, []).append(rel)
        for rels in batches.values():
            spec = ctx.weight_spec(rels[0])
            weights = [ctx.block.get_submodule(r).weight.data for r in rels]
            masks = [ctx.state.masks.get(ctx.full_name(r)) for r in rels]
            mask = None if all(m is None for m in masks) else torch.cat(
                [torch.zeros_like(wt, dtype=torch.bool) if m is None else m for m, wt in zip(masks, weights)])
            q, scale, zero = gptq_quantize(torch.cat(weights), h, spec, observer, a.damp, a.block_size,
                                           a.act_order, a.static_groups, gs=ctx.global_scale(rels[0]), mask=mask,
                                           consume_h=len(batches) == 1, diag_damp=a.diag_damp)
            start = 0
            for rel, weight in zip(rels, weights):
                end = start + weight.shape[0]
                s, z = (scale, zero) if spec.granularity in ("tensor", "block") else (scale[start:end], zero[start:end])
                ctx.set_quantized_weight(rel, q[start:end], spec, s, z)
                start = end

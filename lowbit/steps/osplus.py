"""Outlier Suppression+ (Wei et al., 2023): channel-wise shifting and scaling, folded into the weights.

Per norm group, over the calibration tokens of the linears' input x:
- shifting: z_j = (max_j + min_j) / 2 centres every channel (removes the asymmetry), folded as norm bias
  -= z and linear bias += W z;
- scaling: s_j = max(1, (max_j - z_j) / t, (z_j - min_j) / t) brings every channel inside [-t, t], folded
  as norm weight and bias / s and linear columns * s. The threshold t is searched on a geometric grid from
  the largest channel range down to `min_ratio` of it, minimizing the error of the quantized following
  layers' output: for q/k/v the attention module's output (so the softmax is accounted for), for the MLP's
  inputs the output of its last linear.
With `pairs`, o_proj's and down_proj's inputs are scaled the same way through v_proj's / up_proj's output
rows (scaling only: a shift cannot pass the gating multiply of up -> down).

LLaMA-family models (RMSNorm) have no norm bias to hold -z, and their linears no bias to hold W z. The OS+
authors apply scaling only to LLaMA (their activations there are far less asymmetric than OPT's), and so does
this step by default: shifting is used where the norm and linears have biases (OPT's LayerNorm), `shift: true`
on an RMSNorm model is refused instead of adding an online subtraction or new bias tensors to the checkpoint.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.fold import norm_has_bias, pair_reduce, scale_norm_group, scale_pair, shift_norm_group
from lowbit.models.base import NormGroup
from lowbit.search import channel_ranges, quantized_error, scope_for, scope_output
from lowbit.steps.base import Step, StepArgs, register_step


class OSPlusArgs(StepArgs):
    shift: bool | None = None  # default: shift wherever the norm and its linears have biases (LayerNorm models)
    pairs: bool = True  # also scale o_proj and down_proj inputs through v_proj and up_proj
    grid: int = Field(20, ge=2)  # thresholds tried per group
    min_ratio: float = Field(0.01, gt=0, lt=1)  # smallest threshold, relative to the largest channel range
    search_samples: int = Field(4, gt=0)  # calibration windows used to score a threshold


def can_shift(block: torch.nn.Module, group: NormGroup) -> bool:
    """A shift folds only into a norm with a bias and linears with biases."""
    return norm_has_bias(block.get_submodule(group.norm)) and all(
        block.get_submodule(rel).bias is not None for rel in group.linears)


def osplus_scale(lo: torch.Tensor, hi: torch.Tensor, z: torch.Tensor, t: float) -> torch.Tensor:
    """s_j = max(1, (max_j - z_j) / t, (z_j - min_j) / t)."""
    return torch.maximum((hi - z) / t, (z - lo) / t).clamp_min(1.0)


@register_step
class OutlierSuppressionPlus(Step):
    """Channel-wise shifting (LayerNorm models) and threshold-searched channel-wise scaling, folded into weights."""

    name = "osplus"
    Args = OSPlusArgs

    def before_blocks(self, ctx: ModelContext) -> None:
        if self.args.shift:
            block = ctx.adapter.blocks(ctx.model)[0]
            for group in ctx.adapter.norm_groups:
                if not can_shift(block, group):
                    raise LowbitError(
                        f"osplus.shift: {group.norm} -> {', '.join(group.linears)} cannot hold a channel shift (the "
                        f"norm or a linear has no bias, as in {ctx.adapter.name}-family models with RMSNorm); "
                        f"use shift: false (scaling only, as the OS+ authors do for LLaMA)")

    def on_block(self, ctx: BlockContext) -> None:
        block, adapter = ctx.block, ctx.adapter
        x = ctx.first_windows(self.args.search_samples)
        pairs = adapter.linear_pairs if self.args.pairs else ()
        # every transform below is exact, so all ranges can be measured once, before any of them
        ranges = channel_ranges(ctx, [g.linears[0] for g in adapter.norm_groups] + [p.nexts[0] for p in pairs])
        for group in adapter.norm_groups:
            lo, hi = ranges[group.linears[0]]
            z = torch.zeros_like(lo)
            if self.args.shift is not False and can_shift(block, group):
                z = (lo + hi) / 2
                shift_norm_group(block, group, z)
            self._scale(ctx, x, group.linears, lo, hi, z, lambda s, g=group: scale_norm_group(block, g, s))
        for pair in pairs:
            lo = pair_reduce(block, pair, ranges[pair.nexts[0]][0], ctx.head_dim, "amin")
            hi = pair_reduce(block, pair, ranges[pair.nexts[0]][1], ctx.head_dim, "amax")
            self._scale(ctx, x, (pair.prev, *pair.nexts), lo, hi, torch.zeros_like(lo),
                        lambda s, p=pair: scale_pair(block, p, s, ctx.head_dim))

    def _scale(self, ctx: BlockContext, x: torch.Tensor, rels: tuple[str, ...], lo: torch.Tensor, hi: torch.Tensor,
               z: torch.Tensor, apply: Callable[[torch.Tensor], None]) -> None:
        """Search the threshold t with the lowest quantized output error and fold its scales."""
        scope = scope_for(ctx, rels)
        target = scope_output(ctx, x, scope)
        top = torch.maximum(hi - z, z - lo).max().item()
        if top <= 0:
            return
        best_t, best_err = top, float("inf")
        for k in range(self.args.grid):
            t = top * self.args.min_ratio ** (k / (self.args.grid - 1))
            with ctx.trial():
                apply(osplus_scale(lo, hi, z, t))
                err = quantized_error(ctx, x, target, rels, scope)
            if err < best_err:
                best_t, best_err = t, err
        apply(osplus_scale(lo, hi, z, best_t))

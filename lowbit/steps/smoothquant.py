"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales.

For each norm group, s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) (x: the linears' input over calibration
tokens, W: all linears of the group stacked), folded into the norm (x / s) and the linears' columns (W s).
With `pairs`, the same is done for v -> o (scales shared over grouped-query heads) and up -> down, folded
into the previous linear's output rows. `alpha_grid` searches alpha per group/pair by the block output error
with that group's weights and activations quantized. The FP model is unchanged up to rounding.
"""
from __future__ import annotations

import logging
from typing import Annotated

import torch
from pydantic import Field

from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.fold import pair_reduce, scale_norm_group, scale_pair
from lowbit.search import channel_ranges, quantized_error, scope_output
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class SmoothQuantArgs(StepArgs):
    alpha: float = Field(0.5, ge=0, le=1)  # migration strength: 0 keeps activations, 1 moves all to weights
    alpha_grid: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(None, min_length=1)  # search alpha per group
    # on these values (e.g. [0.3, 0.4, ..., 0.9])
    pairs: bool = False  # also smooth the inputs of o_proj and down_proj through v_proj and up_proj
    search_samples: int = Field(4, gt=0)  # calibration windows used by the alpha search


def smoothing_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_max^alpha / w_max^(1-alpha), kept away from zero for dead channels."""
    return (act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


@register_step
class SmoothQuant(Step):
    """Per-channel smoothing of every norm group (and optionally linear pair) before quantization."""

    name = "smoothquant"
    Args = SmoothQuantArgs

    def before_blocks(self, ctx: ModelContext) -> None:
        if self.args.alpha_grid is not None and ctx.plan.activations is None:
            raise LowbitError("smoothquant.alpha_grid searches with quantized activations: set `activations` "
                              "in the recipe or drop alpha_grid")

    def on_block(self, ctx: BlockContext) -> None:
        block, adapter = ctx.block, ctx.adapter
        sites = [(g.linears, g.linears[0], lambda s, g=g: scale_norm_group(block, g, s), None)
                 for g in adapter.norm_groups]
        if self.args.pairs:
            sites += [((p.prev, *p.nexts), p.nexts[0], lambda s, p=p: scale_pair(block, p, s, ctx.head_dim), p)
                      for p in adapter.linear_pairs]
        x = ctx.first_windows(self.args.search_samples)
        target = scope_output(ctx, x, None) if self.args.alpha_grid else None
        ranges = channel_ranges(ctx, [site[1] for site in sites])  # the transforms are exact: measure once
        chosen = {}
        for rels, reader, apply, pair in sites:
            lo, hi = ranges[reader]
            act_max = torch.maximum(lo.abs(), hi.abs())
            readers = pair.nexts if pair else rels
            w_max = torch.stack([block.get_submodule(r).weight.detach().float().abs().amax(0) for r in readers]).amax(0)
            if pair is not None:
                act_max = pair_reduce(block, pair, act_max, ctx.head_dim)
                w_max = pair_reduce(block, pair, w_max, ctx.head_dim)
            alpha = self.args.alpha
            if self.args.alpha_grid:
                alpha = self._search(ctx, x, target, rels, apply, act_max, w_max)
            chosen[reader] = alpha
            apply(smoothing_scale(act_max, w_max, alpha))
        log.info("smoothquant %s: alpha %s", ctx.name, chosen)

    def _search(self, ctx: BlockContext, x, target, rels, apply, act_max, w_max) -> float:
        """Alpha from the grid with the lowest block output error when this site is quantized."""
        best, best_err = self.args.alpha, float("inf")
        for alpha in self.args.alpha_grid:
            with ctx.trial():
                apply(smoothing_scale(act_max, w_max, alpha))
                err = quantized_error(ctx, x, target, rels, None)
            if err < best_err:
                best, best_err = alpha, err
        return best

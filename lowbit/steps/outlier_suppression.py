"""Outlier Suppression (Wei et al., 2022): gamma migration and token-wise clipping.

Gamma migration: the norm's weight gamma amplifies the outlier channels, so it moves into the following
linears (W diag(gamma)); the norm keeps weight 1 and, for LayerNorm, bias beta / gamma, so the quantized
tensor is the normalized output before gamma. Channels with gamma = 0 are left as they are.

Token-wise clipping picks each static (per-tensor) activation range: a few tokens carry the largest
values, so the range is the alpha-quantile of the token-wise maxima (and the (1 - alpha)-quantile of the
token-wise minima). A coarse grid of alpha is tried, then a fine grid between the best value's
neighbours (the paper's fine stage learns the range by gradient; a fine grid keeps it calibration-only),
each scored by the block output error with that input's linears quantized. With dynamic per-token
activations every token is quantized with its own range, so there is nothing to clip and the step
refuses `token_clipping: true` (the default turns clipping on only for static activations).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from lowbit import distributed
from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.fold import scale_norm_group
from lowbit.search import quantized_error, scope_output
from lowbit.steps.base import Step, StepArgs, register_step


class OSArgs(StepArgs):
    gamma_migration: bool = True
    token_clipping: bool | None = None  # default: on for static activations, off for dynamic per-token
    quantiles: list[Annotated[float, Field(gt=0, le=1)]] = Field([1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9],
                                                                 min_length=1)  # coarse grid of alpha
    fine_steps: int = Field(8, ge=0)  # alphas tried between the best coarse value's neighbours
    search_samples: int = Field(4, gt=0)  # calibration windows used to score a range


@register_step
class OutlierSuppression(Step):
    """Gamma migration into the following linears, then token-wise clipping of static activation ranges."""

    name = "os"
    Args = OSArgs

    def before_blocks(self, ctx: ModelContext) -> None:
        acts = ctx.plan.activations
        static = acts is not None and not acts.dynamic
        if self.args.token_clipping and not static:
            raise LowbitError("os.token_clipping chooses static activation ranges, but the recipe's activations are "
                              f"{'not quantized' if acts is None else 'dynamic per-token'}: set token_clipping: false "
                              "or use static per-tensor activations (dynamic: false, granularity: tensor)")
        self.clip = static if self.args.token_clipping is None else self.args.token_clipping

    def on_block(self, ctx: BlockContext) -> None:
        if self.args.gamma_migration:
            for group in ctx.adapter.norm_groups:
                gamma = ctx.block.get_submodule(group.norm).weight.detach().float()
                scale_norm_group(ctx.block, group, torch.where(gamma.abs() > 1e-6, gamma, torch.ones_like(gamma)))
        if self.clip:
            x = ctx.gathered_windows(self.args.search_samples)  # every rank searches the same windows
            target = scope_output(ctx, x, None)
            for rels in ctx.adapter.input_groups():
                self._clip_site(ctx, rels, x, target)

    def _clip_site(self, ctx: BlockContext, rels: tuple[str, ...], x: torch.Tensor, target: torch.Tensor) -> None:
        """Choose the static range of the quantizers reading one shared input, coarse then fine."""
        tok_min, tok_max = token_extremes(ctx, rels[0])
        quantizers = [q for rel, q in ctx.act_quantizers().items() if rel in rels]

        def error(alpha: float) -> float:
            lo, hi = torch.quantile(tok_min, 1 - alpha), torch.quantile(tok_max, alpha)
            for q in quantizers:
                q.set_range(lo, hi)
            return quantized_error(ctx, x, target, rels, None)

        coarse = sorted(set(self.args.quantiles), reverse=True)
        errs = [error(a) for a in coarse]
        i = min(range(len(coarse)), key=errs.__getitem__)
        best, best_err = coarse[i], errs[i]
        hi_a, lo_a = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
        for a in torch.linspace(lo_a, hi_a, self.args.fine_steps + 2)[1:-1].tolist() if hi_a > lo_a else []:
            err = error(a)
            if err < best_err:
                best, best_err = a, err
        error(best)


@torch.no_grad()
def token_extremes(ctx: BlockContext, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each calibration token's minimum and maximum over the channels of `rel`'s input."""
    mins, maxs = [], []

    def fn(_rel: str, inp: torch.Tensor, _out: torch.Tensor) -> None:
        flat = inp.detach().reshape(-1, inp.shape[-1]).float()
        mins.append(flat.amin(-1))
        maxs.append(flat.amax(-1))

    with ctx.act_quant(False):
        ctx.collect([rel], fn)
    windows, bs = ctx.q_inputs.shape[0], ctx.plan.batch_size  # every rank's tokens, for quantiles over all of them
    return tuple(distributed.gather(torch.cat(t).reshape(windows, -1), bs).reshape(-1) for t in (mins, maxs))


"""OWL (Yin et al. 2024, outlier-weighted layerwise sparsity): blocks with more outliers are pruned less.

On the uncompressed model, each block's outlier ratio D_l is the fraction of its Wanda scores |W|·||X|| (all
its linears together) above M times their mean. Ratios are min-max scaled to [0, 2λ] and shifted to mean
zero: the block's sparsity is target - (that value), so rates span [target - λ, target + λ] and their mean
(every block has the same size) is the target. The ratios are handed to the next pruning step.
"""
from __future__ import annotations

import logging

import torch
from pydantic import Field

from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.sparsity import block_linears, dense_pass, global_rate, input_sq_norms, round_ratios
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class OWLArgs(StepArgs):
    target: float = Field(0.7, ge=0, lt=1)  # global sparsity over all block linears
    m: float = Field(5.0, gt=0)  # outlier threshold, in multiples of the block's mean score (paper: M = 5)
    lam: float = Field(0.08, ge=0, lt=0.5)  # half-width of the per-block rate range (paper: λ = 0.08)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all of a block's scores above m times their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_rates(outliers: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from per-block outlier ratios, as in the paper's reference implementation."""
    d = torch.tensor(outliers, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    rates = target - (scaled - scaled.mean())
    if rates.min() < 0 or rates.max() >= 1:
        raise LowbitError(f"owl: target {target} with lam {lam} gives block rates outside [0, 1): lower lam")
    return rates.tolist()


@register_step
class OWL(Step):
    """Outlier-weighted per-block sparsity for a global target; the following pruning step applies it."""

    name = "owl"
    Args = OWLArgs
    allocates = True  # the pruning steps after it (`targets`) are linked at validation

    def before_blocks(self, ctx: ModelContext) -> None:
        targets = self.targets
        outliers: list[float] = []

        def visit(bctx: BlockContext) -> None:
            norms = input_sq_norms(bctx)
            outliers.append(outlier_ratio([lin.weight.data.float().abs() * norms[rel].sqrt()[None, :]
                                           for rel, lin in bctx.linears().items()], self.args.m))

        dense_pass(ctx, visit)
        rates = owl_rates(outliers, self.args.target, self.args.lam)
        shapes = {n: lin.weight.shape for n, lin in block_linears(ctx.model, ctx.adapter).items()}
        per_layer = {f"{ctx.adapter.block_name(i)}.{rel}": rates[i]
                     for i, block in enumerate(ctx.adapter.blocks(ctx.model)) for rel in ctx.adapter.linears(block)}
        log.info("owl: outlier ratios %s -> block sparsity %s", [f"{o:.4f}" for o in outliers],
                 [f"{r:.3f}" for r in rates])
        for step in targets:
            ratios = round_ratios(per_layer, shapes, step.args.group)
            log.info("owl: global sparsity %.5f (target %.5f)", global_rate(ratios, shapes), self.args.target)
            step.set_layer_ratios(ratios, self.name)

"""Learned per-layer sparsity for a global target, in the spirit of FCPTS (Gong et al. 2024, "Fast and
Controllable Post-training Sparsity"): one learnable rate per linear (or per block, `share: block`), a
differentiable map from rates to soft masks, trained on the whole model's output against the uncompressed
model's, under the global constraint.

Our design: FCPTS learns a magnitude threshold per layer and estimates the resulting rate with a kernel
density estimate. Here each weight's pruning score (Wanda's |W|·||X||, or |W| before magnitude pruning) is
replaced by its rank within its comparison group scaled to [0, 1), so a threshold t_l *is* the layer's rate:
the hard mask {rank < t_l} prunes exactly t_l. The soft mask sigmoid((rank - t_l) / τ) carries gradients to
t_l; the loss is the KL divergence of the next-token distribution of the soft-masked model from the dense
model's on calibration windows. After every Adam step the rates are projected back onto the constraint (a
common shift, found by bisection, so the size-weighted mean rate equals the target, within [lo, hi]); the
final rates are rounded to whole weights with the error carried across layers, so the global rate lands
on the target up to one weight per row. The next pruning step then prunes each layer at its learned rate.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from lowbit import distributed
from lowbit.context import BlockContext, ModelContext
from lowbit.sparsity import block_linears, dense_pass, global_rate, input_sq_norms, project_to_target, round_ratios
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class LearnedArgs(StepArgs):
    target: float = Field(0.7, ge=0, lt=1)  # global sparsity over all block linears
    iters: int = Field(50, ge=0)  # Adam steps (each a forward and backward of the whole model on one batch)
    lr: float = Field(0.02, gt=0)  # on the rates
    tau: float = Field(0.02, gt=0)  # soft-mask temperature, in rank units
    max_shift: float = Field(0.25, gt=0, le=1)  # each layer's rate stays within target ± max_shift
    n_samples: int = Field(16, gt=0)  # calibration windows used (the first ones)
    seq_len: int = Field(128, gt=1)  # tokens per window used (the first ones)
    batch_size: int = Field(2, gt=0)  # windows per step
    seed: int = 0
    share: Literal["linear", "block"] = "linear"  # one rate per linear, or one per decoder block (as OWL)


def rank_scores(score: torch.Tensor, group: str) -> torch.Tensor:
    """Each score's rank within its row (or layer), scaled to [0, 1): the fraction of the group below it."""
    flat = score if group == "row" else score.reshape(1, -1)
    ranks = torch.empty_like(flat, dtype=torch.float32)
    order = flat.argsort(dim=1)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], dtype=torch.float32).expand_as(flat).contiguous())
    return (ranks / flat.shape[1]).reshape(score.shape).to(torch.float16)


class SoftMask(nn.Module):
    """Weight parametrization W · sigmoid((rank - t) / τ), with t one entry of a shared rate vector."""

    def __init__(self, ranks: torch.Tensor, rates: nn.Parameter, index: int, tau: float):
        super().__init__()
        self.register_buffer("ranks", ranks)
        self.rates, self.index, self.tau = rates, index, tau

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.sigmoid((self.ranks.float() - self.rates[self.index]) / self.tau)


def learn_rates(ctx: ModelContext, scores: dict[str, torch.Tensor], group: str, a: LearnedArgs) -> dict[str, float]:
    """Train the per-layer rates on the whole model's output (see the module docstring)."""
    model, names = ctx.model, list(scores)
    linears = {n: model.get_submodule(n) for n in names}
    blocks = [ctx.adapter.block_name(i) + "." for i in range(len(ctx.adapter.blocks(model)))]
    unit = {n: n if a.share == "linear" else next(b for b in blocks if n.startswith(b)) for n in names}
    index = {u: i for i, u in enumerate(dict.fromkeys(unit.values()))}  # rate index of each linear's unit
    sizes = torch.zeros(len(index), dtype=torch.float64)
    for n in names:
        sizes[index[unit[n]]] += linears[n].weight.numel()
    lo, hi = max(0.0, a.target - a.max_shift), min(0.99, a.target + a.max_shift)
    rates = nn.Parameter(torch.full((len(index),), a.target))
    ids = ctx.calib_ids[:distributed.leading(a.n_samples, ctx.plan.batch_size), : a.seq_len]
    with torch.no_grad():
        teacher = [F.log_softmax(model(ids[i: i + a.batch_size], use_cache=False).logits.float(), -1).to(torch.bfloat16)
                   for i in range(0, ids.shape[0], a.batch_size)]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for n in names:
            soft = SoftMask(rank_scores(scores[n], group), rates, index[unit[n]], a.tau)
            parametrize.register_parametrization(linears[n], "weight", soft, unsafe=True)
        opt = torch.optim.Adam([rates], lr=a.lr)
        gen = torch.Generator().manual_seed(a.seed)
        for it in range(a.iters):
            b = int(torch.randint(len(teacher), (1,), generator=gen))
            x = ids[b * a.batch_size: (b + 1) * a.batch_size]
            logp = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
            loss = F.kl_div(logp, teacher[b].float(), log_target=True, reduction="batchmean") / x.shape[1]
            opt.zero_grad()
            loss.backward()
            distributed.average_gradients([rates])  # the same step on every rank
            opt.step()
            with torch.no_grad():
                rates.copy_(project_to_target(rates.double(), sizes, a.target, lo, hi).float())
            if it % 10 == 0 or it == a.iters - 1:
                log.info("learned allocation: step %d KL %.4f, rates %.3f..%.3f", it, loss.item(),
                         rates.min().item(), rates.max().item())
    finally:
        for n in names:
            if parametrize.is_parametrized(linears[n], "weight"):
                parametrize.remove_parametrizations(linears[n], "weight", leave_parametrized=False)
        for p in frozen:
            p.requires_grad_(True)
    return {n: float(rates.detach()[index[unit[n]]]) for n in names}


@register_step
class Learned(Step):
    """Learned per-layer sparsity (FCPTS-style) for a global target; the following pruning step applies it."""

    name = "learned"
    Args = LearnedArgs
    allocates = True  # the pruning steps after it (`targets`) are linked at validation

    def before_blocks(self, ctx: ModelContext) -> None:
        targets = self.targets
        pruner = targets[0]
        scores: dict[str, torch.Tensor] = {}

        def visit(bctx: BlockContext) -> None:
            norms = input_sq_norms(bctx) if pruner.name != "magnitude" else {}
            for rel, lin in bctx.linears().items():
                w = lin.weight.data.float().abs()
                scores[bctx.full_name(rel)] = w * norms[rel].sqrt()[None, :] if norms else w

        dense_pass(ctx, visit)
        rates = learn_rates(ctx, scores, pruner.args.group, self.args)
        shapes = {n: lin.weight.shape for n, lin in block_linears(ctx.model, ctx.adapter).items()}
        for step in targets:
            ratios = round_ratios(rates, shapes, step.args.group)
            log.info("learned allocation: global sparsity %.5f (target %.5f), per layer %s",
                     global_rate(ratios, shapes), self.args.target,
                     {n.rsplit(".", 3)[-3] + "." + n.rsplit(".", 1)[-1]: round(r, 3) for n, r in ratios.items()})
            step.set_layer_ratios(ratios, self.name)

"""QLLM channel reassembly (Liu et al., 2024) with optional low-rank error correction of the quantized block.

Disassembly splits each channel j of a norm output whose range exceeds a threshold t into
T_j = ceil(max|x_j| / t) sub-channels x_j / T_j (the weight column is repeated; exact). Assembly then
merges as many sub-channel pairs as were added, so the width is unchanged: x_s w_s + x_u w_u is replaced
by (x_s + x_u)/2 (w_s + w_u), whose error (x_s - x_u)(w_s - w_u)^T / 2 has Frobenius norm
|x_s - x_u| |w_s - w_u| / 2; pairs are taken greedily by that exact cost, computed from calibration Gram
matrices (siblings of one split channel are never merged). Assembly is exact only for pairs of zero cost;
otherwise it is the paper's approximation.

The block holds the result without widening any linear: the reassembled input x' = x P (each channel a
combination of at most two source channels) is an online input transform of kind "reassembly" on every
linear reading the norm, and their weights become W R (R sums the merged columns). The threshold is
chosen per norm, among budgets of extra channels up to `channel_ratio` of the width (0 = unchanged), by
the block output error against the FP block with weights rounded and activations quantized. With
`lora_rank` > 0 the quantized block is then tuned for `epochs` on its output error through low-rank
updates B A of every linear's weight, merged back into the weights before rounding.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from lowbit import distributed
from lowbit.context import BlockContext, frozen
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant
from lowbit.observers import observe
from lowbit.state import register_input_transform
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class QLLMArgs(StepArgs):
    channel_ratio: float = 0.05  # largest number of extra (disassembled) channels, as a fraction of the width
    candidates: int = 5  # budgets tried, evenly spaced from 0 to channel_ratio
    search_samples: int = Field(4, gt=0)  # calibration windows for channel statistics and for scoring thresholds
    lora_rank: int = 0  # rank of the low-rank error correction (0: none)
    epochs: int = 0
    lr: float = 1e-3


@dataclass
class Reassembly:
    """x'_c = coef_a[c] x[src_a[c]] + coef_b[c] x[src_b[c]]; W'[:, c] = W[:, src_a[c]] + W[:, src_b[c]] (b unused
    where coef_b is 0 and src_b is -1)."""

    src_a: torch.Tensor
    src_b: torch.Tensor
    coef_a: torch.Tensor
    coef_b: torch.Tensor

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        b = self.src_b.clamp_min(0)
        return x[..., self.src_a] * self.coef_a.to(x.dtype) + x[..., b] * self.coef_b.to(x.dtype)

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        merged = (self.src_b >= 0).to(w.dtype)
        return w[:, self.src_a] + w[:, self.src_b.clamp_min(0)] * merged

    def config(self) -> dict:
        return {"kind": "reassembly", "src_a": self.src_a.tolist(), "src_b": self.src_b.tolist(),
                "coef_a": self.coef_a.tolist(), "coef_b": self.coef_b.tolist()}

    @classmethod
    def from_config(cls, cfg: dict) -> "Reassembly":
        return cls(torch.tensor(cfg["src_a"]), torch.tensor(cfg["src_b"]), torch.tensor(cfg["coef_a"]),
                   torch.tensor(cfg["coef_b"]))


@register_input_transform("reassembly")
def _reassembly_input(cfg: dict, _module: nn.Module):
    return Reassembly.from_config(cfg).apply_input


def splits_for(amax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sub-channels per channel: ceil(max|x_j| / t), at least 1."""
    return torch.ceil(amax / threshold).clamp_min(1).long()


def threshold_for_budget(amax: torch.Tensor, extra: int) -> float:
    """Smallest threshold whose disassembly adds at most `extra` channels (bisection; extra is monotone in t)."""
    lo, hi = 0.0, float(amax.max())
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid > 0 and int((splits_for(amax, mid) - 1).sum()) <= extra:
            hi = mid
        else:
            lo = mid
    return hi


def plan_reassembly(amax: torch.Tensor, gram_x: torch.Tensor, gram_w: torch.Tensor, threshold: float) -> Reassembly:
    """Disassemble channels above `threshold`, then merge the cheapest non-sibling sub-channel pairs back to the
    original width. gram_x = X^T X over calibration tokens, gram_w = W^T W over the linears reading X."""
    width = amax.numel()
    splits = splits_for(amax, threshold)
    src = torch.repeat_interleave(torch.arange(width), splits)
    coef = 1.0 / splits[src].double()
    extra = src.numel() - width
    if extra == 0:
        return Reassembly(torch.arange(width), torch.full((width,), -1), torch.ones(width, dtype=torch.float64),
                          torch.zeros(width, dtype=torch.float64))
    gx, gw = gram_x.double()[src][:, src], gram_w.double()[src][:, src]
    dx = (coef**2 * gx.diagonal())[:, None] + (coef**2 * gx.diagonal())[None, :] - 2 * torch.outer(coef, coef) * gx
    dw = gw.diagonal()[:, None] + gw.diagonal()[None, :] - 2 * gw
    cost = (dx.clamp_min(0) * dw.clamp_min(0)).sqrt() / 2
    cost[src[:, None] == src[None, :]] = math.inf  # siblings: merging them would undo the split
    i, j = torch.triu_indices(len(src), len(src), offset=1)
    values = cost[i, j]
    order = torch.argsort(values)
    used = torch.zeros(len(src), dtype=torch.bool)
    partner = torch.full((len(src),), -1)
    merges = 0
    for k in order.tolist():
        a, b = int(i[k]), int(j[k])
        if used[a] or used[b]:
            continue
        if not math.isfinite(float(values[k])):
            raise LowbitError(f"channel assembly found no pair to merge for {extra} extra channels: lower channel_ratio")
        used[a] = used[b] = True
        partner[a] = b
        merges += 1
        if merges == extra:
            break
    keep = [s for s in range(len(src)) if not used[s] or partner[s] >= 0]
    src_a = src[keep]
    src_b = torch.tensor([int(src[partner[s]]) if partner[s] >= 0 else -1 for s in keep])
    half = torch.tensor([0.5 if partner[s] >= 0 else 1.0 for s in keep], dtype=torch.float64)
    coef_a = coef[keep] * half
    coef_b = torch.tensor([float(coef[partner[s]]) * 0.5 if partner[s] >= 0 else 0.0 for s in keep],
                          dtype=torch.float64)
    return Reassembly(src_a, src_b, coef_a, coef_b)


def _block_loss(ctx: BlockContext, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad(), ctx.rounded(), ctx.act_quant(True):
        out = ctx.forward(x)
    return float((out - target).pow(2).mean())


class _LoRAQuant(nn.Module):
    """Parametrization W -> fake_quant(W + B A) with the weight's min-max (or observer) range, STE gradients."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, observer: str, rank: int):
        super().__init__()
        self.spec, self.observer = spec, observer
        out_f, in_f = weight.shape
        self.a = nn.Parameter(torch.randn(rank, in_f, dtype=weight.dtype) / math.sqrt(in_f))
        self.b = nn.Parameter(torch.zeros(out_f, rank, dtype=weight.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        merged = w + self.b @ self.a
        scale, zero = observe(merged.detach(), self.spec, self.observer)
        return fake_quant(merged, scale.to(w.dtype), zero.to(w.dtype), self.spec)


def lora_tune(ctx: BlockContext, rank: int, epochs: int, lr: float) -> None:
    """Train low-rank updates of the quantized block on its output error, then merge them into the FP weights."""
    linears = ctx.linears()
    lora = {rel: _LoRAQuant(linears[rel].weight.data, ctx.weight_spec(rel), ctx.plan.weight_observer, rank)
            for rel in ctx.pending()}
    if not lora:
        return
    params = [p for m in lora.values() for p in (m.a, m.b)]
    opt = torch.optim.Adam(params, lr=lr)
    bs = ctx.plan.batch_size
    with frozen(ctx.block):
        for rel, module in lora.items():
            parametrize.register_parametrization(linears[rel], "weight", module)
        try:
            with torch.enable_grad(), ctx.act_quant(True):
                for _ in range(epochs):
                    for s in range(0, ctx.q_inputs.shape[0], bs):
                        loss = (ctx.run(ctx.q_inputs[s: s + bs]) - ctx.on_device(ctx.fp_outputs[s: s + bs])).pow(2).mean()
                        opt.zero_grad()
                        loss.backward()
                        distributed.average_gradients(params)  # every rank takes the same step
                        opt.step()
        finally:
            for rel, module in lora.items():
                parametrize.remove_parametrizations(linears[rel], "weight", leave_parametrized=False)
                with torch.no_grad():
                    linears[rel].weight.data.add_(module.b @ module.a)


def _group_stats(ctx: BlockContext, first: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max |x| and the Gram matrix X^T X of a linear's input over block inputs `x`."""
    amax, gram = None, None

    def fn(_rel, x, _out):
        nonlocal amax, gram
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        a, g = flat.abs().amax(0), flat.T @ flat
        amax = a if amax is None else torch.maximum(amax, a)
        gram = g if gram is None else gram + g

    ctx.collect([first], fn, x)
    return amax, gram


@torch.no_grad()
def reassemble_block(ctx: BlockContext, args: QLLMArgs) -> dict[str, float]:
    """Choose and apply a channel reassembly for each norm output of the block; returns the chosen thresholds."""
    chosen = {}
    # the same search windows on every rank (gathered under torchrun), so every rank chooses the same
    x, target = (ctx.gathered_windows(args.search_samples, t) for t in (ctx.q_inputs, ctx.fp_outputs))
    for group in ctx.adapter.norm_groups:
        names = [ctx.full_name(r) for r in group.linears]
        if any(nm in ctx.state.transforms for nm in names):
            raise LowbitError(f"{names[0]} already has an online input transform; put qllm before steps that add one")
        linears = [ctx.block.get_submodule(r) for r in group.linears]
        amax, gram_x = _group_stats(ctx, group.linears[0], x)
        w = torch.cat([lin.weight.data.double() for lin in linears])
        gram_w = w.T @ w
        best = (_block_loss(ctx, x, target), None, math.inf)
        width = amax.numel()
        for k in range(1, args.candidates):
            extra = int(args.channel_ratio * width * k / (args.candidates - 1))
            if extra == 0:
                continue
            t = threshold_for_budget(amax, extra)
            plan = plan_reassembly(amax, gram_x, gram_w, t)
            with ctx.trial():
                _apply(ctx, plan, names, linears)
                loss = _block_loss(ctx, x, target)
            if loss < best[0]:
                best = (loss, plan, t)
        if best[1] is not None:
            _apply(ctx, best[1], names, linears)
        chosen[group.norm] = best[2]
    return chosen


def _apply(ctx: BlockContext, plan: Reassembly, names: list[str], linears: list[nn.Linear]) -> None:
    """Reassemble the group's weights and register the matching online input transforms."""
    for name, lin in zip(names, linears):
        lin.weight.data.copy_(plan.apply_weight(lin.weight.data.double()).to(lin.weight.dtype))
        ctx.state.transforms[name] = plan.config()
    ctx.state.install(ctx.model_ctx.model, ctx.name + ".")


@register_step
class QLLM(Step):
    """Channel disassembly + assembly on each norm output, threshold by block output error; optional LoRA tuning."""

    name = "qllm"
    Args = QLLMArgs
    needs_fp_targets = True
    keeps_zeros = False

    def on_block(self, ctx: BlockContext) -> None:
        chosen = reassemble_block(ctx, self.args)
        log.info("qllm %s: outlier thresholds %s (inf: left unchanged)", ctx.name,
                 {k: round(v, 3) for k, v in chosen.items()})
        if self.args.lora_rank > 0 and self.args.epochs > 0:
            lora_tune(ctx, self.args.lora_rank, self.args.epochs, self.args.lr)

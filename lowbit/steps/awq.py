"""AWQ: activation-aware per-input-channel weight scaling, folded into the preceding norm or linear, then a
per-group clipping search; both chosen on the real output error of the quantized module group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import Field
from torch import nn

from lowbit.context import BlockContext, round_to_nearest
from lowbit.fold import pair_expand, pair_reduce, scale_norm_group, scale_pair
from lowbit.formats import QuantSpec, fake_quant, group_view, qparams_from_range
from lowbit.models.base import LinearPair, NormGroup
from lowbit.steps.base import Step, StepArgs, register_step


class AWQArgs(StepArgs):
    n_grid: int = Field(20, gt=0)  # α in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    search_samples: int = Field(4, gt=0)  # calibration windows used by the scale search
    clip: bool | None = None  # None: clip only when this step rounds the weights (a later solver targets unclipped W)
    clip_grid: int = Field(20, gt=0)
    max_shrink: float = Field(0.5, gt=0, lt=1)  # smallest clip ratio tried is 1 - max_shrink
    clip_tokens: int = Field(512, gt=0)  # tokens sampled for the clip search
    quantize: bool | None = None  # None: round unless a later step in the recipe solves weights


@dataclass
class ScaleUnit:
    """Linears whose input channels share one scale, where the inverse scale folds, and what output to measure."""

    linears: tuple[str, ...]
    group: NormGroup | None = None  # fold 1/s into this group's norm ...
    pair: LinearPair | None = None  # ... or into this pair's `prev` linear
    inspect: str | None = None  # module whose output is compared (None: the linears' own outputs)


def scale_units(ctx: BlockContext) -> list[ScaleUnit]:
    """The adapter's norm groups and linear pairs, in execution order."""
    ad = ctx.adapter
    units = [ScaleUnit(g.linears, group=g, inspect=g.inspect) for g in ad.norm_groups]
    units += [ScaleUnit(p.nexts, pair=p) for p in ad.linear_pairs]
    return sorted(units, key=lambda u: ad.linear_order.index(u.linears[0]))


def fold_scale(ctx: BlockContext, unit: ScaleUnit, s: torch.Tensor) -> None:
    """Multiply the unit's input channels by `s` and divide the producer by `s`: the FP function is unchanged.

    For v -> o with grouped-query attention `s` is equal across o_proj's copies of a v_proj row (`_tie_heads`).
    """
    if unit.group is not None:
        scale_norm_group(ctx.block, unit.group, s)
    else:
        scale_pair(ctx.block, unit.pair, pair_reduce(ctx.block, unit.pair, s, ctx.head_dim), ctx.head_dim)


def _tie_heads(ctx: BlockContext, unit: ScaleUnit, stat: torch.Tensor) -> torch.Tensor:
    """Average a per-o_proj-input statistic over the heads sharing one KV head, so scales can fold into v_proj."""
    if unit.pair is None:
        return stat
    mean = pair_reduce(ctx.block, unit.pair, stat, ctx.head_dim, "mean")
    return pair_expand(ctx.block, unit.pair, mean, ctx.head_dim)


def quantize_scaled(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W·diag(s))·diag(s)⁻¹ with min-max parameters: what W computes once s is folded and W·s quantized."""
    return round_to_nearest(w * s, spec, "minmax")[0] / s


class _Replay:
    """Captured calls of one module (per-batch inputs plus its extra arguments) that can be re-run."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict = {}

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            self.inputs.append(args[0])
            self.args = args[1:]
        else:
            self.inputs.append(kwargs["hidden_states"])
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        outs = []
        for x in self.inputs:
            out = self.module(x, *self.args, **self.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


def capture(ctx: BlockContext, unit: ScaleUnit, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], list]]:
    """Inputs of the unit's linears on block inputs `x`, and a function giving the inspected outputs."""
    feats: list[torch.Tensor] = []
    replay = None
    handle = None
    if unit.inspect is not None:
        replay = _Replay(ctx.block.get_submodule(unit.inspect))
        handle = replay.module.register_forward_pre_hook(replay.hook, with_kwargs=True)
    try:
        ctx.collect([unit.linears[0]], lambda _r, inp, _o: feats.append(inp), x=x, stop_early=True)
    finally:
        if handle is not None:
            handle.remove()
    if replay is not None:
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]), replay.outputs
    linears = [ctx.block.get_submodule(r) for r in unit.linears]

    @torch.no_grad()
    def outputs() -> list[torch.Tensor]:
        return [torch.cat([lin(f) for lin in linears], -1) for f in feats]

    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]), outputs


@torch.no_grad()
def search_scale(ctx: BlockContext, unit: ScaleUnit, x: torch.Tensor, n_grid: int) -> torch.Tensor:
    """s = mean|x|^α (normalized), α on a grid, minimizing the inspected output's MSE with quantized weights."""
    feats, outputs = capture(ctx, unit, x)
    stat = _tie_heads(ctx, unit, feats.abs().mean(0))
    target = outputs()
    linears = {r: ctx.block.get_submodule(r) for r in unit.linears if ctx.weight_spec(r) is not None}
    originals = {r: lin.weight.data.clone() for r, lin in linears.items()}
    best, best_s = float("inf"), torch.ones_like(stat)
    with ctx.trial():
        for k in range(n_grid):
            s = stat.pow(k / n_grid).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for r, lin in linears.items():
                lin.weight.data.copy_(quantize_scaled(originals[r], s, ctx.weight_spec(r)))
            err = sum(((o - t) ** 2).sum().item() for o, t in zip(outputs(), target))
            if err < best:
                best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float) -> torch.Tensor:
    """Per group, the shrink ratio r of [min, max] minimizing the group's contribution to the output error
    on inputs `x` [tokens, in]; returns w clamped to the chosen ranges."""
    gw = group_view(w, spec).reshape(w.shape[0], -1, group_view(w, spec).shape[-1])  # [out, ng, g]
    xg = x.reshape(x.shape[0], gw.shape[1], gw.shape[2]).transpose(0, 1)  # [ng, t, g]
    lo0, hi0 = gw.amin(-1), gw.amax(-1)
    row_spec = spec.row_spec()
    best = torch.full_like(lo0, float("inf"))
    best_r = torch.ones_like(lo0)
    for i in range(int(max_shrink * grid) + 1):
        r = 1 - i / grid
        scale, zero = qparams_from_range((lo0 * r).reshape(-1), (hi0 * r).reshape(-1), row_spec)
        flat = gw.reshape(-1, gw.shape[-1])
        dq = (fake_quant(flat, scale[:, None], zero[:, None], row_spec) - flat).reshape(gw.shape)
        err = torch.bmm(xg, dq.permute(1, 2, 0)).pow(2).mean(1).T  # [out, ng]
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    lo, hi = (lo0 * best_r)[..., None], (hi0 * best_r)[..., None]
    return torch.maximum(torch.minimum(gw, hi), lo).reshape(w.shape)


@register_step
class AWQ(Step):
    """Activation-aware weight quantization (Lin et al., 2023): scales searched per block, then clipping.

    Rounds the weights itself (min-max on the clipped weights) unless the pipeline gives the rounding to a later
    weight solver (e.g. `awq` then `gptq`); then it leaves scaled FP weights for that step, unclipped unless
    `clip: true`, since a later solver's target moves with the clipping (docs/results.md compares both).
    """

    name = "awq"
    Args = AWQArgs
    solves_weights = True
    defers_rounding = True
    transforms_block = True

    def __init__(self, args: AWQArgs | None = None):
        super().__init__(args)
        if self.args.quantize is not None:
            self.solves_weights = self.args.quantize
            self.defers_rounding = False

    def on_block(self, ctx: BlockContext) -> None:
        a = self.args
        x = ctx.gathered_windows(a.search_samples)  # the same search windows on every rank: same decisions
        for unit in scale_units(ctx):
            if ctx.pending(unit.linears):
                fold_scale(ctx, unit, search_scale(ctx, unit, x, a.n_grid))
        todo = ctx.pending()
        quantize = ctx.rounds and self.solves_weights
        clip = quantize if a.clip is None else a.clip
        if clip and todo:
            self._clip(ctx, todo, x)
        if quantize:
            for rel in todo:
                ctx.round_to_nearest(rel, "minmax" if clip else None)

    def _clip(self, ctx: BlockContext, rels: list[str], x: torch.Tensor) -> None:
        feats: dict[str, list[torch.Tensor]] = {r: [] for r in rels}
        ctx.collect(rels, lambda r, inp, _o: feats[r].append(inp.reshape(-1, inp.shape[-1])), x=x, stop_early=True)
        gen = torch.Generator().manual_seed(ctx.index)
        for rel in rels:
            if ctx.weight_spec(rel).granularity == "tensor":
                continue
            xs = torch.cat(feats[rel])
            xs = xs[torch.randperm(xs.shape[0], generator=gen)[:self.args.clip_tokens]]
            lin = ctx.block.get_submodule(rel)
            lin.weight.data.copy_(search_clip(lin.weight.data.float(), xs, ctx.weight_spec(rel),
                                              self.args.clip_grid, self.args.max_shrink))

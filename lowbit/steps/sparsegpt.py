"""SparseGPT (Frantar & Alistarh 2023): prune with second-order weight updates, one linear at a time.

Shares GPTQ's Hessian collection and column loop (`gptq_quantize` with a mask selector): every `block_size`
columns (every M for N:M) the weights with the smallest w² / [H⁻¹]_ii² (the inverse Hessian's Cholesky
diagonal) are chosen from the already-compensated weights, set to zero, and their error is spread over the
columns not yet reached. With a weight format and no later weight solver it quantizes in the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from lowbit.context import BlockContext
from lowbit.sparsity import Pattern, prune_mask
from lowbit.steps.base import register_step
from lowbit.steps.gptq import accumulate_hessians, gptq_quantize
from lowbit.steps.pruning import PruneArgs, PruneStep


class SparseGPTArgs(PruneArgs):
    group: Literal["row", "layer"] = "layer"  # paper: all rows of each block of columns compete together
    damp: float = Field(0.01, ge=0)  # added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = Field(128, gt=0)  # columns per lazy update and per unstructured mask selection
    quantize: bool | None = None  # None: quantize in the same pass unless a later step solves the weights


@dataclass
class ObsSelector:
    """Adaptive mask selection: prune the lowest w² / d² of the next `every` columns at the layer's ratio."""

    every: int
    ratio: float
    pattern: Pattern
    group: str

    def __call__(self, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return prune_mask(w.pow(2) / d.pow(2)[None, :], self.ratio, self.pattern, self.group)


@register_step
class SparseGPT(PruneStep):
    """Second-order pruning (and optionally quantization) of each linear, from the block's input Hessians."""

    name = "sparsegpt"
    Args = SparseGPTArgs

    solves_weights = True
    defers_rounding = True  # by default quantizes only when no later step solves the weights

    def __init__(self, args: SparseGPTArgs | None = None):
        super().__init__(args)
        if self.args.quantize is not None:
            self.solves_weights = self.args.quantize
            self.defers_rounding = False

    def prune_block(self, ctx: BlockContext, rels: list[str]) -> None:
        a = self.args
        groups = [tuple(r for r in g if r in rels) for g in ctx.adapter.input_groups()]
        groups = [g for g in groups if g]
        hessians = accumulate_hessians(ctx, groups)
        quantize = ctx.rounds and self.solves_weights
        for group in groups:
            for rel in group:
                name = ctx.full_name(rel)
                linear = ctx.block.get_submodule(rel)
                spec = ctx.weight_spec(rel) if quantize and not ctx.is_quantized(rel) else None
                every = self.pattern.m if self.pattern.structured else a.block_size
                select = ObsSelector(every, self.ratio_for(name), self.pattern, a.group)
                mask = torch.zeros_like(linear.weight.data, dtype=torch.bool)
                q, scale, zero = gptq_quantize(linear.weight.data, hessians[group[0]], spec,
                                               ctx.plan.weight_observer, a.damp, a.block_size, mask=mask,
                                               select=select)
                ctx.state.masks[name] = mask
                if spec is None:
                    linear.weight.data.copy_(q.to(linear.weight.dtype))
                else:
                    ctx.set_quantized_weight(rel, q, spec, scale, zero)

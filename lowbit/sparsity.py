"""Sparsity shared by the pruning and allocation steps: patterns, mask selection, the no-revival check, order
validation, ratio rounding and projection, the dense model-level pass and the achieved-sparsity report.

A mask (True = pruned, the weight is exactly zero) is run state: `QuantState.masks[name]`. Once a layer has a
mask, every later step must leave those weights at zero; the pipeline checks it after each step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from lowbit import distributed
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.context import BlockContext, ModelContext
    from lowbit.models.base import Adapter
    from lowbit.state import QuantState
    from lowbit.steps.base import Step


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M: at most n nonzeros in every m consecutive inputs of a row."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """'unstructured' or 'N:M' with 0 < N < M."""
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4, got {text!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern {text}: need 0 < N < M (N kept out of every M inputs)")
    return Pattern(n, m)


def prune_mask(score: torch.Tensor, ratio: float, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest-scoring weights of `score` [out, in].

    N:M prunes the m - n lowest of every m consecutive inputs of a row; unstructured prunes round(ratio * in)
    per row (group 'row') or round(ratio * numel) over the layer (group 'layer'), so the rate is exact.
    """
    rows, cols = score.shape
    if pattern.structured:
        g = score.reshape(rows, cols // pattern.m, pattern.m)
        idx = g.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    if group == "row":
        idx = score.topk(round(ratio * cols), dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    flat = score.reshape(-1)
    idx = flat.topk(round(ratio * flat.numel()), largest=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).reshape(rows, cols)


def check_widths(ctx: "ModelContext", pattern: Pattern, step: str) -> None:
    """Refuse an N:M pattern whose M does not divide a block linear's input width, naming the layer."""
    if not pattern.structured:
        return
    for i, block in enumerate(ctx.adapter.blocks(ctx.model)):
        for rel, linear in ctx.adapter.linears(block).items():
            if linear.in_features % pattern.m:
                raise LowbitError(f"{step}: pattern {pattern} needs input widths divisible by {pattern.m}, but "
                                  f"{ctx.adapter.block_name(i)}.{rel} has {linear.in_features}; use another M or "
                                  f"pattern: unstructured")


def record_mask(ctx: "BlockContext", rel: str, mask: torch.Tensor) -> None:
    """Zero the pruned weights of a block linear and keep its mask in the run state."""
    linear = ctx.block.get_submodule(rel)
    linear.weight.data.masked_fill_(mask, 0)
    ctx.state.masks[ctx.full_name(rel)] = mask.detach().cpu()


def check_masks(ctx: "BlockContext", after: str) -> None:
    """Refuse to go on if a step made a pruned weight of this block nonzero (no step may revive one)."""
    for rel, linear in ctx.linears().items():
        mask = ctx.state.masks.get(ctx.full_name(rel))
        if mask is not None and linear.weight.data[mask].any():
            count = int((linear.weight.data[mask] != 0).sum())
            raise LowbitError(f"step {after!r} made {count} pruned weights of {ctx.full_name(rel)} nonzero; put "
                              f"transformations that mix input channels before the pruning step")


def check_model_masks(model: nn.Module, state: "QuantState", where: str) -> None:
    """Every masked weight of a loaded or exported model is zero, else the run folder is inconsistent."""
    for name, mask in state.masks.items():
        weight = model.get_submodule(name).weight.data
        if weight.shape != mask.shape or weight[mask].any():
            raise LowbitError(f"{where}: weight {name} does not match its saved sparsity mask; the run folder is "
                              f"inconsistent, rerun it")


def validate_order(steps: Sequence["Step"]) -> None:
    """Refuse a step that mixes input channels (rotation, channel disassembly) after a pruning step, and hand each
    allocation step the pruning steps that follow it (it sets their per-layer ratios)."""
    pruner = None
    for i, step in enumerate(steps):
        if pruner is not None and not step.keeps_zeros:
            raise LowbitError(f"step {step.name!r} after {pruner!r} would make pruned weights nonzero (it mixes input "
                              f"channels): put {step.name!r} before {pruner!r}")
        if getattr(step, "prunes", False):
            pruner = step.name
        if getattr(step, "allocates", False):
            step.targets = [s for s in steps[i + 1:] if hasattr(s, "set_layer_ratios")]
            if not step.targets:
                raise LowbitError(f"step {step.name!r} allocates per-layer sparsity but no pruning step follows it: "
                                  f"add e.g. wanda or sparsegpt after it")


def block_linears(model: nn.Module, adapter: "Adapter") -> dict[str, nn.Linear]:
    """Every decoder-block linear by full name (the weights a global sparsity target counts)."""
    return {f"{adapter.block_name(i)}.{rel}": lin for i, block in enumerate(adapter.blocks(model))
            for rel, lin in adapter.linears(block).items()}


def round_ratios(ratios: dict[str, float], shapes: dict[str, torch.Size], group: str) -> dict[str, float]:
    """Ratios a pruning step can hit exactly (whole weights per row for group 'row'), rounded with the error
    carried to the next layer so the global rate stays on target."""
    out, carry = {}, 0.0
    for name, ratio in ratios.items():
        rows, cols = shapes[name]
        unit = rows if group == "row" else 1  # weights pruned per step of the count
        want = ratio * rows * cols + carry
        count = min(max(round(want / unit), 0), rows * cols // unit)
        carry = want - count * unit
        out[name] = count * unit / (rows * cols)
    return out


def global_rate(ratios: dict[str, float], shapes: dict[str, torch.Size]) -> float:
    total = sum(s[0] * s[1] for s in shapes.values())
    return sum(ratios[n] * shapes[n][0] * shapes[n][1] for n in ratios) / total


def project_to_target(rates: torch.Tensor, sizes: torch.Tensor, target: float, lo: float, hi: float) -> torch.Tensor:
    """The shift c such that the size-weighted mean of clamp(rates + c, lo, hi) equals `target` (bisection)."""
    a, b = -1.0, 1.0
    for _ in range(60):
        c = (a + b) / 2
        if float((torch.clamp(rates + c, lo, hi) * sizes).sum() / sizes.sum()) < target:
            a = c
        else:
            b = c
    return torch.clamp(rates + (a + b) / 2, lo, hi)


@torch.no_grad()
def dense_pass(ctx: "ModelContext", visit: Callable[["BlockContext"], None]) -> None:
    """Walk the uncompressed model block by block on the calibration windows, calling `visit` on each block
    (a model-level pass for allocation steps; nothing is changed)."""
    from lowbit.context import BlockContext
    from lowbit.pipeline import capture_block_inputs

    inputs, args, kwargs = capture_block_inputs(ctx.model, ctx.adapter, ctx.calib_ids)
    for i, block in enumerate(ctx.adapter.blocks(ctx.model)):
        bctx = BlockContext(ctx, i, block, inputs, args, kwargs)
        visit(bctx)
        inputs = bctx.forward()


def input_sq_norms(bctx: "BlockContext") -> dict[str, torch.Tensor]:
    """Per block linear, the squared L2 norm of each input feature over all calibration tokens (of all ranks)."""
    sums: dict[str, torch.Tensor] = {}

    def add(rel: str, x: torch.Tensor, _out) -> None:
        sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
        sums[rel] = sums[rel] + sq if rel in sums else sq

    bctx.collect(list(bctx.linears()), add, stop_early=True)
    return {rel: distributed.reduce(sums.get(rel, lin.weight.new_zeros(lin.weight.shape[1], dtype=torch.float32)))
            for rel, lin in bctx.linears().items()}


def detect_pattern(masks: dict[str, torch.Tensor]) -> str:
    """'2:4' / '4:8' when every mask prunes exactly half of each group of 4 / 8 inputs, else 'unstructured'."""
    for n, m in ((2, 4), (4, 8)):
        if masks and all(k.shape[-1] % m == 0 and bool((k.reshape(-1, m).sum(-1) == m - n).all())
                         for k in masks.values()):
            return f"{n}:{m}"
    return "unstructured"


def sparsity_report(model: nn.Module, adapter: "Adapter", state: "QuantState") -> dict | None:
    """Achieved sparsity (fraction of masked weights) per pruned layer and over all block linears; None if dense."""
    if not state.masks:
        return None
    linears = block_linears(model, adapter)
    total = sum(lin.weight.numel() for lin in linears.values())
    pruned = sum(int(m.sum()) for m in state.masks.values())
    layers = {n: round(float(m.float().mean()), 6) for n, m in state.masks.items()}
    return {"overall": pruned / total, "pruned": pruned, "weights": total, "layers": layers}

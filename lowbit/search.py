"""Measuring candidate transforms inside one block: activation ranges, and output error once quantized.

Searches (SmoothQuant's alpha, OS token clipping, OS+ thresholds, AWQ scales, QLLM thresholds) try a
transform under `BlockContext.trial`, quantize the affected linears' weights (round to nearest, temporarily)
and inputs, and compare a module's output with its full-precision value on the search windows.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lowbit import distributed
from lowbit.context import BlockContext, StopForward


@torch.no_grad()
def channel_ranges(ctx: BlockContext, rels: Sequence[str], x: torch.Tensor | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of each listed module's input over every calibration token (of every rank)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(rel: str, inp: torch.Tensor, _out: torch.Tensor) -> None:
        flat = inp.detach().reshape(-1, inp.shape[-1]).float()
        lo, hi = flat.amin(0), flat.amax(0)
        if rel in out:
            lo, hi = torch.minimum(out[rel][0], lo), torch.maximum(out[rel][1], hi)
        out[rel] = (lo, hi)

    with ctx.act_quant(False):
        ctx.collect(list(dict.fromkeys(rels)), fn, x)
    if not distributed.active():
        return out
    inf = torch.tensor(float("inf"))
    for rel in dict.fromkeys(rels):  # over every rank's tokens (a rank without windows adds nothing)
        width = ctx.block.get_submodule(rel).weight.shape[1]
        lo, hi = out.get(rel, (inf.expand(width), -inf.expand(width)))
        out[rel] = (distributed.reduce(lo, "min"), distributed.reduce(hi, "max"))
    return out


@torch.no_grad()
def scope_output(ctx: BlockContext, x: torch.Tensor, scope: str | None) -> torch.Tensor:
    """Output of the module `scope` (relative name) on inputs `x`, or of the whole block when None.

    The block's forward stops right after `scope`, so measuring attention skips the MLP.
    """
    if scope is None or x.shape[0] == 0:
        return ctx.forward(x)
    outs: list[torch.Tensor] = []

    def hook(_m, _args, out):
        outs.append((out[0] if isinstance(out, tuple) else out).detach().float())
        raise StopForward

    handle = ctx.block.get_submodule(scope).register_forward_hook(hook)
    bs = ctx.plan.batch_size
    try:
        for i in range(0, x.shape[0], bs):
            try:
                ctx.run(x[i: i + bs])
            except StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(outs)


@torch.no_grad()
def quantized_error(ctx: BlockContext, x: torch.Tensor, target: torch.Tensor, rels: Sequence[str],
                    scope: str | None) -> float:
    """Mean squared error of `scope`'s output against `target` with `rels` quantized (weights and inputs), over
    the search windows of every rank."""
    with ctx.rounded(rels), ctx.act_quant(True, rels):
        out = scope_output(ctx, x, scope)
    err = (out.float() - target.float()).pow(2)
    if not distributed.active():
        return err.mean().item()
    total = distributed.reduce(torch.tensor([err.sum().item(), err.numel()], dtype=torch.float64))
    return (total[0] / total[1]).item()


def scope_for(ctx: BlockContext, rels: Sequence[str]) -> str:
    """Where to measure a transform of these linears: the attention output for attention linears, else the
    output of the MLP's last linear."""
    prefix = ctx.adapter.attention + "."
    return ctx.adapter.attention if all(r.startswith(prefix) for r in rels) else ctx.adapter.mlp_out

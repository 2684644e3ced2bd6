"""KV-cache quantization, simulated: output quantizers on the key and value projections of every block.

Per token and head (`granularity: head`, one scale per head_dim values) or per token (`token`), dynamic,
symmetric or not. Keys are quantized before the rotary embedding (the projection's output), an
approximation of a cache that stores rotated keys. Put it after `rotate`, whose per-head Hadamard on the
values spreads their outliers.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from lowbit.actquant import ActQuantizer
from lowbit.context import ModelContext
from lowbit.formats import QuantSpec
from lowbit.steps.base import Step, StepArgs, register_step


class KVCacheArgs(StepArgs):
    bits: int = Field(8, ge=2, le=8)
    granularity: Literal["head", "token"] = "head"
    symmetric: bool = False


@register_step
class KVCache(Step):
    """KV-cache quantization, simulated: dynamic per-head or per-token quantizers on the k/v projection outputs."""

    name = "kvcache"
    Args = KVCacheArgs

    def before_blocks(self, ctx: ModelContext) -> None:
        a = self.args
        spec = (QuantSpec(a.bits, symmetric=a.symmetric, granularity="group", group_size=ctx.adapter.head_dim(ctx.model),
                          dynamic=True) if a.granularity == "head"
                else QuantSpec(a.bits, symmetric=a.symmetric, granularity="token", dynamic=True))
        for i in range(len(ctx.adapter.blocks(ctx.model))):
            for rel in ctx.adapter.kv_linears:
                q = ActQuantizer(spec)
                q.enabled = False
                ctx.state.output_quantizers[f"{ctx.adapter.block_name(i)}.{rel}"] = q

"""ShortGPT-style block removal (Men et al. 2024), the structured baseline: drop the decoder blocks that change
the hidden state least. Block influence BI_i = 1 - mean over tokens of cos(block input, block output), on the
uncompressed model; the round(target · blocks) lowest are removed by pruning all their linears (a block whose
attention and MLP outputs are zero is the identity on the residual stream, exactly as if it were deleted)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import Field

from lowbit import distributed
from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.sparsity import dense_pass
from lowbit.steps.base import Step, StepArgs, register_step

log = logging.getLogger("lowbit")


class ShortGPTArgs(StepArgs):
    target: float = Field(0.25, gt=0, lt=1)  # fraction of decoder blocks (and so of block linear weights) removed


@register_step
class ShortGPT(Step):
    """Removes the least influential decoder blocks (block influence on the dense model)."""

    name = "shortgpt"
    Args = ShortGPTArgs
    prunes = True

    def before_blocks(self, ctx: ModelContext) -> None:
        influence: list[float] = []

        def visit(bctx: BlockContext) -> None:
            out = bctx.forward()
            cos = F.cosine_similarity(bctx.q_inputs.float(), out.float(), dim=-1)
            total = distributed.reduce(torch.tensor([cos.double().sum().item(), cos.numel()], dtype=torch.float64))
            influence.append(1 - (total[0] / total[1]).item())  # mean over every rank's tokens

        dense_pass(ctx, visit)
        n = round(self.args.target * len(influence))
        if n == 0:
            raise LowbitError(f"shortgpt: target {self.args.target} removes no block of {len(influence)}: raise it")
        drop = sorted(torch.tensor(influence).argsort()[:n].tolist())
        log.info("shortgpt: block influence %s; removing blocks %s", [f"{b:.4f}" for b in influence], drop)
        blocks = ctx.adapter.blocks(ctx.model)
        for i in drop:
            for rel, lin in ctx.adapter.linears(blocks[i]).items():
                mask = torch.ones_like(lin.weight.data, dtype=torch.bool)
                lin.weight.data.zero_()
                if lin.bias is not None:
                    lin.bias.data.zero_()
                ctx.state.masks[f"{ctx.adapter.block_name(i)}.{rel}"] = mask

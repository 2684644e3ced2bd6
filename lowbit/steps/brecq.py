"""BRECQ (Li et al. 2021): learn the rounding of all of a decoder block's linears together on the block output.

Inputs come from the already-quantized previous blocks; the target is the FP block's output. Optionally the
squared error is weighted by the Fisher diagonal of the block output: the squared gradient of the FP model's
next-token loss w.r.t. that output on each calibration window, computed once before the block loop. Its memory
cost is one [windows, seq_len, hidden] bfloat16 tensor per block: 2 * blocks * windows * seq_len * hidden bytes
(SmolLM2-135M, 16 x 256 windows: 2 * 30 * 16 * 256 * 576 B = 142 MB)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import distributed
from lowbit.context import BlockContext, ModelContext
from lowbit.models.base import Adapter
from lowbit.reconstruction import BlockReconArgs, reconstruct_block
from lowbit.steps.base import Step, init_solver, register_step


class BRECQArgs(BlockReconArgs):
    fisher: bool = False  # weight the output error by the Fisher diagonal of the block output


def fisher_diagonal(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the squared gradient of the summed next-token loss w.r.t. its output, window by window,
    scaled to mean 1 per block (over every rank's windows) so the regularizer weight keeps its meaning."""
    blocks = adapter.blocks(model)
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[torch.Tensor] = []

    def keep(_mod, _args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    def needs_grad(_mod, args):
        return (args[0].detach().requires_grad_(True), *args[1:])

    handles = [b.register_forward_hook(keep) for b in blocks] + [blocks[0].register_forward_pre_hook(needs_grad)]
    try:
        for row in ids:
            outputs.clear()
            logits = model(row[None]).logits[0, :-1].float()
            loss = F.cross_entropy(logits, row[1:], reduction="sum")
            for i, g in enumerate(torch.autograd.grad(loss, outputs)):
                grads[i].append(g.detach().pow(2).to(torch.bfloat16))
    finally:
        for h in handles:
            h.remove()
    result = []
    for per_window in grads:
        f = torch.cat(per_window).float()
        mean = distributed.reduce(torch.stack([f.sum(), torch.tensor(f.numel(), dtype=f.dtype)]).double())
        result.append((f / (mean[0] / mean[1]).float().clamp_min(1e-30)).to(torch.bfloat16))
    return result


@register_step
class BRECQ(Step):
    """Block-wise learned rounding; activations (if the recipe quantizes them) are on during training."""

    name = "brecq"
    Args = BRECQArgs
    needs_fp_targets = True
    solves_weights = True

    def __init__(self, args: BRECQArgs | None = None):
        super().__init__(args)
        self.init = init_solver(self.args.init, f"{self.name}.init")
        self.fisher: list[torch.Tensor] | None = None

    def needs_whole_model(self) -> bool:
        return self.args.fisher

    def before_blocks(self, ctx: ModelContext) -> None:
        if self.init is not None:
            self.init.before_blocks(ctx)
        if self.args.fisher:
            ids = ctx.calib_ids[:distributed.leading(self.args.n_samples, ctx.plan.batch_size)]
            self.fisher = fisher_diagonal(ctx.model, ctx.adapter, ids)

    def on_block(self, ctx: BlockContext) -> None:
        reconstruct_block(ctx, self.args, self.init, quantize_acts=ctx.plan.activations is not None,
                          drop=self.drop(), fisher=None if self.fisher is None else self.fisher[ctx.index])

    def drop(self) -> float | None:
        """Probability of replacing a quantized activation by its FP value during training (None: never; QDrop)."""
        return None

"""Learnable weight clipping (OmniQuant's LWC): per-group factors on each weight group's min and max, trained
through the straight-through estimator to match the full-precision block output."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from lowbit import distributed
from lowbit.context import BlockContext, frozen
from lowbit.formats import QuantSpec, fake_quant, group_view, params_shape, round_ste
from lowbit.reconstruction import Loss, output_error
from lowbit.steps.base import Step, StepArgs, register_step


class LWCArgs(StepArgs):
    """CPU defaults: 5 epochs of batch 1 (80 Adam steps per block with 16 windows), since a few steps at OmniQuant's
    lr hardly move the clipping (docs/results.md compares them). OmniQuant's GPU setting: 20 epochs over 128 windows
    of 2048 tokens, lr 5e-3."""

    epochs: int = Field(5, ge=0)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(1, gt=0)
    init: float = 4.0  # initial logit of both factors: sigmoid(4) ≈ 0.982 of the (possibly AWQ-clipped) range
    loss: Loss = "mse"  # OmniQuant's; docs/results.md compares it with "token_relative"


def clipped_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `qparams_from_range`, but the zero point rounds with a straight-through gradient so `lo` is learnable."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.format == "fp" or spec.symmetric:
        top = spec.fp.max if spec.format == "fp" else spec.qmax
        scale = torch.maximum(hi, -lo).clamp_min(1e-8) / top
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(1e-8)
    zero = torch.clamp(round_ste(-lo / scale) + spec.qmin, spec.qmin, spec.qmax)
    return scale, zero


class ClippedWeight(nn.Module):
    """Parametrization W -> Q(W) with each group's range [σ(β)·min, σ(γ)·max]."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, init: float):
        super().__init__()
        self.spec = spec
        n = group_view(weight, spec).shape[0]
        self.up = nn.Parameter(torch.full((n,), init))
        self.low = nn.Parameter(torch.full((n,), init))

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = group_view(w.float(), self.spec)
        scale, zero = clipped_qparams(g.amin(-1) * torch.sigmoid(self.low), g.amax(-1) * torch.sigmoid(self.up),
                                      self.spec)
        shape = params_shape(w, self.spec)
        return scale.reshape(shape), zero.reshape(shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Q(W) computed in float32, returned in the weight's own dtype (a bf16 model stays bf16)."""
        scale, zero = self.qparams(w)
        return fake_quant(w.float(), scale, zero, self.spec).to(w.dtype)


@register_step
class LWC(Step):
    """Trains clipping factors of every linear of the block at once on the block output MSE (quantized-path
    inputs vs FP targets), then stores the weights quantized with the learned ranges."""

    name = "lwc"
    Args = LWCArgs
    needs_fp_targets = True
    solves_weights = True

    def on_block(self, ctx: BlockContext) -> None:
        rels = ctx.pending()
        if not rels:
            return
        clips, results = {}, {}
        with frozen(ctx.block):
            for rel in rels:
                lin = ctx.block.get_submodule(rel)
                clips[rel] = ClippedWeight(lin.weight, ctx.weight_spec(rel), self.args.init)
                parametrize.register_parametrization(lin, "weight", clips[rel])
            try:
                self._train(ctx, [p for c in clips.values() for p in c.parameters()])
            finally:
                with torch.no_grad():
                    for rel, clip in clips.items():
                        lin = ctx.block.get_submodule(rel)
                        w = lin.parametrizations.weight.original
                        results[rel] = (clip(w), *clip.qparams(w))
                        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        for rel, (w, scale, zero) in results.items():
            ctx.set_quantized_weight(rel, w, ctx.weight_spec(rel), scale, zero)

    def _train(self, ctx: BlockContext, params: list[nn.Parameter]) -> None:
        a = self.args
        x, y = ctx.q_inputs, ctx.fp_outputs
        opt = torch.optim.Adam(params, lr=a.lr)
        gen = torch.Generator().manual_seed(ctx.index)
        with torch.enable_grad():
            for _ in range(a.epochs):
                for idx in torch.randperm(x.shape[0], generator=gen).split(a.batch_size):
                    loss = output_error(ctx.run(x[idx]), ctx.on_device(y[idx]), loss=a.loss)
                    opt.zero_grad()
                    loss.backward()
                    distributed.average_gradients(params)  # the same step on every rank
                    opt.step()

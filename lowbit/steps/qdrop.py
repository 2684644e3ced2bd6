"""QDrop (Wei et al. 2022): block reconstruction where activation quantization is randomly dropped.

Each activation quantizer's output, and the block input (quantized path vs FP path), is replaced element-wise
by its FP value with probability `drop` during training; after the block, drop is off. Static activation step
sizes are learned with LSQ alongside the rounding; dynamic per-token activations have no step size to learn,
so there only the rounding is trained (under dropped activation noise)."""
from __future__ import annotations

from pydantic import Field

from lowbit.context import BlockContext
from lowbit.reconstruction import BlockReconArgs, reconstruct_block
from lowbit.steps.base import Step, init_solver, register_step


class QDropArgs(BlockReconArgs):
    drop: float = Field(0.5, ge=0, le=1)  # probability of replacing a quantized value by its FP value


@register_step
class QDrop(Step):
    """drop=0 is BRECQ with quantized activations; drop=1 is weight-only reconstruction on FP inputs."""

    name = "qdrop"
    Args = QDropArgs
    needs_fp_targets = True
    solves_weights = True

    def __init__(self, args: QDropArgs | None = None):
        super().__init__(args)
        self.init = init_solver(self.args.init, f"{self.name}.init")

    def on_block(self, ctx: BlockContext) -> None:
        reconstruct_block(ctx, self.args, self.init, quantize_acts=ctx.plan.activations is not None, drop=self.args.drop)

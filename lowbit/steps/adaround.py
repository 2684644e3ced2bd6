"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down, one linear at a time, on that
linear's output error. Settings, CPU defaults and paper defaults: `lowbit.reconstruction.ReconArgs`."""
from __future__ import annotations

from lowbit.context import BlockContext, ModelContext
from lowbit.reconstruction import Loss, ReconArgs, reconstruct_layers
from lowbit.steps.base import Step, init_solver, register_step


class AdaRoundArgs(ReconArgs):
    loss: Loss = "mse"  # the sink token dominates block outputs (the residual stream), not one linear's output;
    # docs/results.md compares both losses for AdaRound


@register_step
class AdaRound(Step):
    """Layer-wise learned rounding: inputs from the quantized path, target = FP weight on the same inputs."""

    name = "adaround"
    Args = AdaRoundArgs
    solves_weights = True

    def __init__(self, args: AdaRoundArgs | None = None):
        super().__init__(args)
        self.init = init_solver(self.args.init, f"{self.name}.init")
        self.needs_fp_targets = self.init is not None and self.init.needs_fp_targets

    def before_blocks(self, ctx: ModelContext) -> None:
        if self.init is not None:
            self.init.before_blocks(ctx)

    def on_block(self, ctx: BlockContext) -> None:
        reconstruct_layers(ctx, self.args, self.init)

"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down, one linear at a time, on that
linear's output error. Settings, CPU defaults and paper defaults: `lowbit.reconstruction.ReconArgs`."""
from __future__ import annotations

from lowbit.pipeline import BlockContext
from lowbit.reconstruction import ReconArgs, reconstruct_layers
from lowbit.steps.base import Step, register_step


@register_step
class AdaRound(Step):
    """Layer-wise learned rounding: inputs from the quantized path, target = FP weight on the same inputs."""

    name = "adaround"
    Args = ReconArgs
    solves_weights = True

    def on_block(self, ctx: BlockContext) -> None:
        reconstruct_layers(ctx, self.args)

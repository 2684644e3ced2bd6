"""Round-to-nearest: each weight group quantized independently with its observer's range."""
from __future__ import annotations

from typing import Literal

from lowbit.context import BlockContext
from lowbit.steps.base import Step, StepArgs, register_step


class RTNArgs(StepArgs):
    observer: Literal["minmax", "mse", "percentile"] | None = None  # default: the weights spec's observer


@register_step
class RTN(Step):
    """The calibration-free baseline; also what the pipeline applies to any weight no solver handled."""

    name = "rtn"
    Args = RTNArgs
    solves_weights = True
    needs_calibration = False

    def on_block(self, ctx: BlockContext) -> None:
        for rel in ctx.pending():
            ctx.round_to_nearest(rel, self.args.observer)

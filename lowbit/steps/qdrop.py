"""QDrop (Wei et al. 2022): block reconstruction where activation quantization is randomly dropped.

Each activation quantizer's output, and the block input (quantized path vs FP path), is replaced element-wise
by its FP value with probability `drop` during training; after the block, drop is off. Static activation step
sizes are learned with LSQ alongside the rounding; dynamic per-token activations have no step size to learn,
so there only the rounding is trained (under dropped activation noise). Everything else is BRECQ's."""
from __future__ import annotations

from pydantic import Field

from lowbit.steps.base import register_step
from lowbit.steps.brecq import BRECQ, BRECQArgs


class QDropArgs(BRECQArgs):
    drop: float = Field(0.5, ge=0, le=1)  # probability of replacing a quantized value by its FP value


@register_step
class QDrop(BRECQ):
    """drop=0 is BRECQ with quantized activations; drop=1 is weight-only reconstruction on FP inputs."""

    name = "qdrop"
    Args = QDropArgs

    def drop(self) -> float | None:
        return self.args.drop

"""The step interface and registry: every algorithm is one module defining one registered `Step` subclass.

A step may act on the whole model before the block loop (`before_blocks`, e.g. rotation folded into the
embedding and head), on each decoder block (`on_block`, e.g. smoothing, GPTQ), and after the loop
(`after_blocks`). Its arguments are a pydantic model, so recipes are validated with errors naming the key.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.pipeline import BlockContext, ModelContext

STEPS: dict[str, type["Step"]] = {}


class StepArgs(BaseModel):
    """Base for step arguments: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Step:
    name: ClassVar[str]
    Args: ClassVar[type[StepArgs]] = StepArgs
    needs_fp_targets: ClassVar[bool] = False  # keep the full-precision path (FP block inputs and outputs)
    solves_weights: ClassVar[bool] = False  # quantizes weights itself (else the pipeline rounds them)
    needs_calibration: ClassVar[bool] = True  # reads calibration activations (RTN does not: no forward passes)

    def __init__(self, args: StepArgs | None = None):
        self.args = args if args is not None else self.Args()

    def needs_whole_model(self) -> bool:
        """True if the step reads or changes every block at once (it cannot run one block in memory at a time)."""
        return False

    def before_blocks(self, ctx: "ModelContext") -> None:
        """Called once on the whole model before calibration inputs are captured."""

    def on_block(self, ctx: "BlockContext") -> None:
        """Called for each decoder block, in order, with that block's calibration inputs."""

    def after_blocks(self, ctx: "ModelContext") -> None:
        """Called once after every block has been processed."""


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make `cls` available to recipes under `cls.name`."""
    if cls.name in STEPS:
        raise ValueError(f"step {cls.name!r} registered twice")
    STEPS[cls.name] = cls
    return cls


def get_step(name: str) -> type[Step]:
    if name not in STEPS:
        raise LowbitError(f"unknown step {name!r}: available steps are {', '.join(sorted(STEPS))}")
    return STEPS[name]

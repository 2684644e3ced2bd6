"""The step interface and registry: every algorithm is one module defining one registered `Step` subclass.

A step may act on the whole model before the block loop (`before_blocks`, e.g. rotation folded into the
embedding and head), on each decoder block (`on_block`, e.g. smoothing, GPTQ), and after the loop
(`after_blocks`). Its arguments are a pydantic model, so recipes are validated with errors naming the key.

A step declares what it does, and the pipeline decides from those declarations (read on the step instance,
so they may depend on the step's arguments): `solves_weights` (it can produce the final rounding of the weights
still pending), `defers_rounding` (it rounds only when no later step in the recipe solves weights),
`transforms_block` (it changes the block beyond those weights, e.g. folds scales into a norm) and
`needs_fp_targets` (it needs the full-precision path's block inputs and outputs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.context import BlockContext, ModelContext

STEPS: dict[str, type["Step"]] = {}


class StepArgs(BaseModel):
    """Base for step arguments: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Step:
    name: ClassVar[str]
    Args: ClassVar[type[BaseModel]] = StepArgs
    needs_fp_targets: bool = False  # keep the full-precision path (FP block inputs and outputs)
    solves_weights: bool = False  # can produce the final rounding of pending weights (else the pipeline rounds)
    defers_rounding: bool = False  # rounds only if no later step solves weights (else leaves them FP for it)
    transforms_block: bool = False  # changes block parameters other than the weights it rounds
    needs_calibration: bool = True  # reads calibration activations (RTN does not: no forward passes)
    keeps_zeros: bool = True  # zero weights stay zero (False: mixes input channels; refused after pruning)

    def __init__(self, args: BaseModel | None = None):
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


def build_step(name: str, args: dict[str, Any] | None, where: str) -> Step:
    """A step from its recipe name and arguments; a bad argument is a one-line error naming `where` and the key."""
    cls = get_step(name)
    try:
        return cls(cls.Args(**(args or {})))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]))
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise LowbitError(f"recipe error at {loc}: {err['msg']}{more}") from None


def init_solver(init: str | dict[str, dict], where: str) -> Step | None:
    """The step whose rounding starts a learned rounding (`init:`), or None for "fractional".

    Only a weight solver that leaves the rest of the block alone qualifies: its weights are read, then the block is
    rolled back, so a step that also folds scales (AWQ) would start the rounding from a different function.
    """
    if init == "fractional":
        return None
    if isinstance(init, dict) and len(init) != 1:
        raise LowbitError(f"{where}: give one step, e.g. {{gptq: {{act_order: true}}}}, got {init!r}")
    name, kwargs = (init, {}) if isinstance(init, str) else next(iter(init.items()))
    usable = sorted(n for n, s in STEPS.items() if s.solves_weights and not s.transforms_block)
    if name not in STEPS:
        raise LowbitError(f"{where}: unknown step {name!r}: use 'fractional' or one of {usable}")
    step = build_step(name, kwargs, f"{where}.{name}")
    if not step.solves_weights or step.defers_rounding or step.transforms_block:
        what = "also changes the block beyond its weights" if step.transforms_block else "does not solve weights"
        raise LowbitError(f"{where}: {name!r} {what}, so it cannot start a learned rounding: use 'fractional' or "
                          f"one of {usable}")
    return step

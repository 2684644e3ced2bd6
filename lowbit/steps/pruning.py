"""The base of the pruning steps (magnitude, wanda, sparsegpt): arguments, per-layer ratios handed over by an
allocation step (`lowbit.sparsity.validate_order` links them), pattern checks."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from lowbit.context import BlockContext, ModelContext
from lowbit.errors import LowbitError
from lowbit.sparsity import check_widths, parse_pattern
from lowbit.steps.base import Step, StepArgs


class PruneArgs(StepArgs):
    ratio: float = Field(0.5, ge=0, lt=1)  # fraction of weights set to zero (unstructured; per layer if uniform)
    pattern: str = "unstructured"  # or N:M (N kept in every M consecutive inputs of a row), e.g. 2:4, 4:8
    group: Literal["row", "layer"] = "row"  # weights compete for survival within a row or the whole layer

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"pattern must be a string: quote N:M in YAML, e.g. pattern: '2:4' (unquoted, YAML reads "
                             f"it as the number {value!r})")
        parse_pattern(value)
        return value


class PruneStep(Step):
    """Base of the pruning steps: per-layer ratio (uniform, or handed over by an allocation step), width checks,
    and recording the mask. Subclasses implement `prune_block`."""

    prunes: ClassVar[bool] = True
    transforms_block = True  # sets weights to zero (not a rounding)
    Args = PruneArgs

    def __init__(self, args: PruneArgs | None = None):
        super().__init__(args)
        self.pattern = parse_pattern(self.args.pattern)
        self.layer_ratios: dict[str, float] | None = None  # set by an allocation step earlier in the recipe

    def set_layer_ratios(self, ratios: dict[str, float], by: str) -> None:
        """Called by an allocation step: prune each layer (full name) at its own ratio."""
        if self.pattern.structured:
            raise LowbitError(f"allocation step {by!r} sets per-layer ratios, but {self.name} uses the fixed pattern "
                              f"{self.pattern}: use pattern: unstructured or drop {by!r}")
        self.layer_ratios = ratios

    def ratio_for(self, name: str) -> float:
        if self.pattern.structured:
            return self.pattern.ratio
        return self.args.ratio if self.layer_ratios is None else self.layer_ratios[name]

    def before_blocks(self, ctx: ModelContext) -> None:
        check_widths(ctx, self.pattern, self.name)

    def on_block(self, ctx: BlockContext) -> None:
        rels = [r for r in ctx.linears() if ctx.full_name(r) not in ctx.state.masks]
        if rels:
            self.prune_block(ctx, rels)

    def prune_block(self, ctx: BlockContext, rels: list[str]) -> None:
        raise NotImplementedError

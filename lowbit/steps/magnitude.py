"""Magnitude pruning: zero the weights of smallest absolute value (per row or per layer); no calibration data."""
from __future__ import annotations

from typing import Literal

from lowbit.context import BlockContext
from lowbit.sparsity import prune_mask, record_mask
from lowbit.steps.base import register_step
from lowbit.steps.pruning import PruneArgs, PruneStep


class MagnitudeArgs(PruneArgs):
    group: Literal["row", "layer"] = "layer"  # the classic baseline compares across the whole layer


@register_step
class Magnitude(PruneStep):
    """|W| pruning, unstructured or N:M; the baseline every calibration-based method is measured against."""

    name = "magnitude"
    Args = MagnitudeArgs

    def prune_block(self, ctx: BlockContext, rels: list[str]) -> None:
        for rel in rels:
            w = ctx.block.get_submodule(rel).weight.data
            record_mask(ctx, rel, prune_mask(w.float().abs(), self.ratio_for(ctx.full_name(rel)), self.pattern,
                                             self.args.group))

"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||, the weight times the L2 norm of its input feature over the
calibration tokens, compared within each output row (or the whole layer); no weight update."""
from __future__ import annotations

from lowbit.context import BlockContext
from lowbit.sparsity import input_sq_norms, prune_mask, record_mask
from lowbit.steps.base import register_step
from lowbit.steps.pruning import PruneStep


def wanda_score(w, sq_norm):
    """|W| scaled by each input feature's L2 norm (the paper's metric)."""
    return w.float().abs() * sq_norm.sqrt()[None, :]


@register_step
class Wanda(PruneStep):
    """Pruning by weight and activation; inputs come through the already-pruned earlier blocks."""

    name = "wanda"

    def prune_block(self, ctx: BlockContext, rels: list[str]) -> None:
        norms = input_sq_norms(ctx)
        for rel in rels:
            w = ctx.block.get_submodule(rel).weight.data
            score = wanda_score(w, norms[rel])
            record_mask(ctx, rel, prune_mask(score, self.ratio_for(ctx.full_name(rel)), self.pattern,
                                             self.args.group))

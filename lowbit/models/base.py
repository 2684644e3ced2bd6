"""Model adapters: the only place that knows where an architecture keeps its blocks, norms and linears.

Algorithms ask an adapter questions ("which linears does this norm feed?") instead of naming modules.
Names are relative to a decoder block (e.g. "self_attn.q_proj") or to the model for model-level parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class NormGroup:
    """A normalization layer and the linear layers that read its output (targets for smoothing/rotation)."""

    norm: str
    linears: tuple[str, ...]
    inspect: str | None = None  # module whose output reflects these linears' error (None: the linears themselves)


@dataclass(frozen=True)
class LinearPair:
    """A linear whose output feeds other linears through an elementwise-linear path (v -> o, up -> down).

    Per-channel scales on the input of `nexts` can be folded into the output rows of `prev`.
    `heads` is set for v -> o, where scales must repeat across grouped-query heads.
    """

    prev: str
    nexts: tuple[str, ...]
    heads: bool = False


@dataclass(frozen=True)
class Adapter:
    """Describes one architecture family. See llama.py and opt.py for instances."""

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    embedding_paths: tuple[str, ...]
    final_norm_path: str
    head_path: str
    norm_kind: str  # "rmsnorm" or "layernorm" (layernorm has a bias and subtracts the mean)
    norm_groups: tuple[NormGroup, ...]
    linear_pairs: tuple[LinearPair, ...]
    attention: str  # relative name of the attention module
    mlp_out: str  # the last linear of the MLP (its input is the MLP's hidden activation)
    linear_order: tuple[str, ...] = field(default=())  # block linears in execution order

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(p) for p in self.embedding_paths if _has(model, p)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.head_path)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linear layers in execution order, by relative name."""
        return {name: block.get_submodule(name) for name in self.linear_order}

    def input_groups(self) -> list[tuple[str, ...]]:
        """Block linears grouped by shared input, in execution order (e.g. q/k/v, o, gate/up, down)."""
        grouped = {rel: g.linears for g in self.norm_groups for rel in g.linears}
        groups: list[tuple[str, ...]] = []
        for rel in self.linear_order:
            group = grouped.get(rel, (rel,))
            if group not in groups:
                groups.append(group)
        return groups


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False

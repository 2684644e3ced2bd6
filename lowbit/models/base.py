"""Model adapters: the only place that knows where an architecture keeps its blocks, norms and linears.

Algorithms ask an adapter questions ("which linears does this norm feed?") instead of naming modules.
Names are relative to a decoder block (e.g. "self_attn.q_proj") or to the model for model-level parts.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit import gemm
from lowbit.errors import LowbitError


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
    attn_out: str  # the attention's output projection (with mlp_out, the linears writing the residual stream)
    kv_linears: tuple[str, ...]  # the key and value projections (their outputs are what a KV cache stores)
    linear_order: tuple[str, ...] = field(default=())  # block linears in execution order
    gated_mlp: str | None = None  # a block's act(gate_proj(x)) * up_proj(x) -> down_proj MLP, if it has one
    pre_norm_flag: str | None = None  # config key that is false when blocks normalize after the residual add
    # GGUF (llama.cpp) facts: model_type -> llama.cpp architecture; the architectures whose q/k rows llama.cpp
    # expects with each head's rotary halves interleaved; module path -> GGUF tensor name (block modules
    # relative to the block, written as blk.{i}.NAME; model modules absolute)
    gguf_archs: tuple[tuple[str, str], ...] = ()
    gguf_interleaved_rope: tuple[str, ...] = ()
    gguf_block_names: tuple[tuple[str, str], ...] = ()
    gguf_model_names: tuple[tuple[str, str], ...] = ()

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

    def head_dim(self, model: nn.Module) -> int:
        """Channels per attention head, from the transformers config."""
        config = model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def hidden_size(self, model: nn.Module) -> int:
        """Width of the residual stream."""
        return model.config.hidden_size

    def context_length(self, model: nn.Module) -> int | None:
        """Positions the model was built for (None if its config does not say)."""
        return getattr(model.config, "max_position_embeddings", None)

    def pre_norm(self, model: nn.Module) -> bool:
        """Whether each block normalizes its input before attention and MLP (rather than after the residual add)."""
        return self.pre_norm_flag is None or bool(getattr(model.config, self.pre_norm_flag, True))

    def tied_head(self, model: nn.Module) -> bool:
        """Whether the head shares its weight with an input embedding."""
        return any(self.head(model).weight is e.weight for e in self.embeddings(model))

    def untie_head(self, model: nn.Module) -> None:
        """Give the head its own copy of the weight and record that in the config, so the checkpoint keeps both."""
        head = self.head(model)
        if self.tied_head(model):
            head.weight = nn.Parameter(head.weight.data.clone())
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text.tie_word_embeddings = False

    def prepare(self, model: nn.Module) -> None:
        """Give the model faster forwards (idempotent): every linear through `lowbit.gemm` (oneDNN for float32 on
        the CPU: the same numbers to float32 rounding) and, with the same bits, this family's gated MLP
        multiplying its activation by the up projection in place: one activation-sized allocation fewer per call,
        which the CPU's block forwards feel (docs/scale.md, "Compression time")."""
        gemm.route_linears(model)
        if self.gated_mlp is None:
            return
        for block in self.blocks(model):
            mlp = block.get_submodule(self.gated_mlp)
            mlp.forward = types.MethodType(_gated_mlp_forward, mlp)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linear layers in execution order, by relative name."""
        return {name: block.get_submodule(name) for name in self.linear_order}

    def gguf_arch(self, model_type: str) -> str:
        """llama.cpp's architecture name for a model_type of this family."""
        archs = dict(self.gguf_archs)
        if model_type not in archs:
            raise LowbitError(f"GGUF export has no llama.cpp architecture for {model_type!r}: supported are "
                              f"{', '.join(archs) or 'none'}; use --format compressed-tensors")
        return archs[model_type]

    def gguf_tensor_name(self, param: str) -> str:
        """llama.cpp's name for a transformers parameter (e.g. model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
        module, _, kind = param.rpartition(".")
        if module in dict(self.gguf_model_names):
            return f"{dict(self.gguf_model_names)[module]}.{kind}"
        prefix = self.blocks_path + "."
        index, _, rel = module[len(prefix):].partition(".") if module.startswith(prefix) else ("", "", "")
        if not index.isdigit() or rel not in dict(self.gguf_block_names):
            raise LowbitError(f"parameter {param} has no GGUF counterpart in the {self.name} adapter")
        return f"blk.{index}.{dict(self.gguf_block_names)[rel]}.{kind}"

    def gguf_block_name(self, rel: str) -> str | None:
        """GGUF's short name of a block module (e.g. mlp.down_proj -> ffn_down), used by type mixes."""
        return dict(self.gguf_block_names).get(rel)

    def input_groups(self) -> list[tuple[str, ...]]:
        """Block linears grouped by shared input, in execution order (e.g. q/k/v, o, gate/up, down)."""
        grouped = {rel: g.linears for g in self.norm_groups for rel in g.linears}
        groups: list[tuple[str, ...]] = []
        for rel in self.linear_order:
            group = grouped.get(rel, (rel,))
            if group not in groups:
                groups.append(group)
        return groups


def _gated_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' gated MLP forward, down(act(gate(x)) * up(x)), with the product in place where no gradient
    flows (the activation's output is a fresh tensor: no module output or hooked tensor is overwritten)."""
    h = mlp.act_fn(mlp.gate_proj(x))
    up = mlp.up_proj(x)
    return mlp.down_proj(h * up if h.requires_grad else h.mul_(up))


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False

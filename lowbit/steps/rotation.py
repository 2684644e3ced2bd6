"""QuaRot-style rotation: an orthogonal change of basis of the residual stream that removes activation outliers.

Every norm's scale (and LayerNorm bias) is fused into the linears it feeds, so norms become scale-free and
commute with an orthogonal Q. The residual stream is then rotated by a seeded random Hadamard matrix
Q = diag(signs) H / sqrt(d): folded into the embeddings (E Q), every linear reading the residual (W Q),
every linear writing it (Q^T W) and the head (W Q). The attention values are rotated per head by H_head
(v_proj rows, o_proj columns; offline, as in QuaRot), and the down projection's input gets an online
Hadamard transform (W_down H^T offline, x -> H x at run time through `QuantState.transforms`).
LayerNorm (OPT) subtracts the mean, which commutes with Q only if Q maps the all-ones vector to itself:
there Q is composed with the Householder reflection that makes it so (instead of QuaRot's switch to
RMSNorm, which would change the architecture and the saved checkpoint). The FP function is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.context import ModelContext
from lowbit.errors import LowbitError
from lowbit.hadamard import factorize, hadamard_matrix, hadamard_transform, orthogonal_matrix
from lowbit.models.base import Adapter
from lowbit.state import register_input_transform
from lowbit.steps.base import Step, StepArgs, register_step


class RotationArgs(StepArgs):
    seed: int = 0  # seed of the random signs of the residual rotation (and of any dense fallback)
    online_down: bool = True  # online Hadamard transform on the down projection's input
    heads: bool = True  # per-head Hadamard on the values (v_proj -> o_proj); skipped if head_dim has no known H


@register_input_transform("hadamard")
def _hadamard_input(cfg: dict, _module: nn.Module):
    return hadamard_transform


@register_input_transform("orthogonal")
def _orthogonal_input(cfg: dict, _module: nn.Module):
    matrix = orthogonal_matrix(cfg["size"], cfg["seed"]).float()
    return lambda x: x @ matrix.to(x.device, x.dtype).T


def online_matrix(n: int, seed: int) -> tuple[torch.Tensor, dict]:
    """The orthogonal H of an online transform x -> H x of size n and its `QuantState.transforms` entry:
    the fast Hadamard transform when H_n is known, else a seeded random orthogonal matrix (dense matmul)."""
    if factorize(n) is not None:
        return hadamard_matrix(n), {"kind": "hadamard", "size": n}
    return orthogonal_matrix(n, seed), {"kind": "orthogonal", "size": n, "seed": seed}


def residual_rotation(d: int, seed: int, keep_mean: bool) -> torch.Tensor:
    """Random orthogonal Q (float64) for the residual stream; with keep_mean, also Q @ 1 = 1 (for LayerNorm)."""
    q = orthogonal_matrix(d, seed)
    if not keep_mean:
        return q
    ones = torch.ones(d, dtype=torch.float64)
    v = q.sum(dim=1) - ones  # reflect Q 1 onto 1: P = I - 2 v v^T / |v|^2, both vectors have norm sqrt(d)
    if v.norm() < 1e-9:
        return q
    return q - 2 * torch.outer(v, v @ q) / (v @ v)


def _linear_fold(linear: nn.Linear, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> None:
    """W <- left @ W @ right and b <- left @ b, computed in float32 (rounding ~1e-7, far below the FP check)."""
    w = linear.weight.data.float()
    if left is not None:
        w = left.float() @ w
        if linear.bias is not None:
            linear.bias.data.copy_((left.float() @ linear.bias.data.float()).to(linear.bias.dtype))
    if right is not None:
        w = w @ right.float()
    linear.weight.data.copy_(w.to(linear.weight.dtype))


def fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Move a norm's scale (and its bias, when every reader has a bias) into the linears reading it.

    The norm is left scale-free; a bias it keeps (e.g. OPT's final LayerNorm before the bias-free head)
    lives in the residual basis and is rotated with it.
    """
    gamma = norm.weight.data.double()
    beta = norm.bias.data.double() if getattr(norm, "bias", None) is not None else None
    fuse_bias = beta is not None and all(linear.bias is not None for linear in linears)
    if beta is not None and not fuse_bias and (gamma == 0).any():
        raise LowbitError("a norm with zero scale entries feeds a bias-free linear: its bias cannot be kept "
                          "through the rotation")
    for linear in linears:
        w = linear.weight.data.double()
        if fuse_bias:
            linear.bias.data.copy_((linear.bias.data.double() + w @ beta).to(linear.bias.dtype))
        linear.weight.data.copy_((w * gamma[None, :]).to(linear.weight.dtype))
    norm.weight.data.fill_(1.0)
    if fuse_bias:
        norm.bias.data.zero_()
    elif beta is not None:
        norm.bias.data.copy_((beta / gamma).to(norm.bias.dtype))


def check_supported(model: nn.Module, adapter: Adapter) -> None:
    if not adapter.pre_norm(model):
        raise LowbitError("rotation needs pre-norm blocks; this model normalizes after the residual add "
                          f"({adapter.pre_norm_flag}=False, e.g. OPT-350m)")
    for path in adapter.embedding_paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if module is not None and not isinstance(module, nn.Embedding):
            raise LowbitError(f"rotation does not support the embedding projection {path}; use a model whose "
                              f"embeddings have the hidden size")


def _rotate_heads(model: nn.Module, adapter: Adapter, block: nn.Module) -> None:
    """Per-head Hadamard on the values: v_proj output rows H W_v (per head), o_proj input columns W_o H^T."""
    hd = adapter.head_dim(model)
    if factorize(hd) is None:
        return
    h = hadamard_matrix(hd)
    for pair in adapter.linear_pairs:
        if not pair.heads:
            continue
        v = block.get_submodule(pair.prev)
        _linear_fold(v, left=torch.block_diag(*[h] * (v.out_features // hd)))
        for rel in pair.nexts:
            o = block.get_submodule(rel)
            _linear_fold(o, right=torch.block_diag(*[h.T] * (o.in_features // hd)))


def _norm_names(adapter: Adapter) -> tuple[str, ...]:
    return (*(g.norm for g in adapter.norm_groups), adapter.final_norm_path)


@torch.no_grad()
def rotate_model(ctx: ModelContext, args: RotationArgs) -> None:
    """Apply the whole rotation in place and register the online transforms in ctx.state."""
    model, adapter = ctx.model, ctx.adapter
    check_supported(model, adapter)
    adapter.untie_head(model)
    blocks = adapter.blocks(model)
    for block in blocks:
        for group in adapter.norm_groups:
            fuse_norm(block.get_submodule(group.norm), [block.get_submodule(r) for r in group.linears])
    fuse_norm(adapter.final_norm(model), [adapter.head(model)])

    d = adapter.hidden_size(model)
    q = residual_rotation(d, args.seed, keep_mean=adapter.norm_kind == "layernorm")
    for emb in adapter.embeddings(model):
        emb.weight.data.copy_((emb.weight.data.float() @ q.float()).to(emb.weight.dtype))
    for i, block in enumerate(blocks):
        for group in adapter.norm_groups:
            for rel in group.linears:
                _linear_fold(block.get_submodule(rel), right=q)
        for rel in (adapter.attn_out, adapter.mlp_out):
            _linear_fold(block.get_submodule(rel), left=q.T)
        if args.heads:
            _rotate_heads(model, adapter, block)
        if args.online_down:
            down = block.get_submodule(adapter.mlp_out)
            h, cfg = online_matrix(down.in_features, args.seed)
            _linear_fold(down, right=h.T)
            ctx.state.transforms[f"{adapter.block_name(i)}.{adapter.mlp_out}"] = cfg
    head = adapter.head(model)
    head.weight.data.copy_((head.weight.data.float() @ q.float()).to(head.weight.dtype))
    for name, module in model.named_modules():
        if name.endswith(_norm_names(adapter)) and getattr(module, "bias", None) is not None:
            module.bias.data.copy_((module.bias.data.double() @ q).to(module.bias.dtype))
    ctx.state.install(model)


@register_step
class Rotation(Step):
    """Hadamard rotation of the residual stream (and the down projection's input); put it before any solver."""

    name = "rotate"
    Args = RotationArgs
    keeps_zeros = False

    def needs_whole_model(self) -> bool:
        return True

    def before_blocks(self, ctx: ModelContext) -> None:
        rotate_model(ctx, self.args)

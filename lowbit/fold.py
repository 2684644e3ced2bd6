"""Equivalent per-channel transforms folded into weights: the FP function of a block stays exactly the same.

A norm group (norm -> linears) can make the linears' input (x - z) / s instead of x: the norm's output
is divided by s (its weight, and its bias for LayerNorm) and shifted by -z (LayerNorm bias only), while
each linear multiplies its input columns by s and adds W z to its bias. A linear pair (v -> o, up -> down)
can divide the `prev` output rows by s and multiply the `nexts` input columns by s (`head_dim`, from the adapter,
lays per-head scales over grouped-query heads). SmoothQuant, Outlier
Suppression and Outlier Suppression+ are all choices of s and z on top of these primitives.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import LinearPair, NormGroup


def norm_has_bias(norm: nn.Module) -> bool:
    return getattr(norm, "bias", None) is not None


@torch.no_grad()
def scale_norm_group(block: nn.Module, group: NormGroup, s: torch.Tensor) -> None:
    """Make the group's linears read x / s: divide the norm's weight (and bias), multiply the linears' columns."""
    _check_scale(s, group.norm)
    norm = block.get_submodule(group.norm)
    _mul_(norm.weight, 1 / s)
    if norm_has_bias(norm):
        _mul_(norm.bias, 1 / s)
    for rel in group.linears:
        _mul_(block.get_submodule(rel).weight, s[None, :])


@torch.no_grad()
def shift_norm_group(block: nn.Module, group: NormGroup, z: torch.Tensor) -> None:
    """Make the group's linears read x - z: subtract z from the norm's bias, add W z to each linear's bias.

    Only a norm with a bias (LayerNorm) can absorb the shift, and every linear needs a bias to take W z.
    """
    norm = block.get_submodule(group.norm)
    if not norm_has_bias(norm):
        raise LowbitError(f"cannot fold a channel shift into {group.norm}: it has no bias (RMSNorm); "
                          f"disable shifting (shift: false) for this model")
    for rel in group.linears:
        linear = block.get_submodule(rel)
        if linear.bias is None:
            raise LowbitError(f"cannot fold a channel shift into {rel}: the linear has no bias; "
                              f"disable shifting (shift: false) for this model")
    zf = z.float()
    for rel in group.linears:
        linear = block.get_submodule(rel)
        linear.bias.data.copy_((linear.bias.data.float() + linear.weight.data.float() @ zf).to(linear.bias.dtype))
    norm.bias.data.copy_((norm.bias.data.float() - zf).to(norm.bias.dtype))


def pair_expand(block: nn.Module, pair: LinearPair, s: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-channel values on `prev`'s outputs laid out on `nexts`' inputs (repeated over grouped-query heads)."""
    prev = block.get_submodule(pair.prev)
    width = block.get_submodule(pair.nexts[0]).in_features
    if not pair.heads or width == prev.out_features:
        return s
    n_kv, n_rep = prev.out_features // head_dim, width // prev.out_features
    return s.reshape(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)


def pair_reduce(block: nn.Module, pair: LinearPair, v: torch.Tensor, head_dim: int,
                reduce: str = "amax") -> torch.Tensor:
    """Per-channel statistics of `nexts`' inputs reduced onto `prev`'s outputs (amax, amin or mean over the heads
    sharing one)."""
    prev = block.get_submodule(pair.prev)
    if v.numel() == prev.out_features:
        return v
    n_kv = prev.out_features // head_dim
    grouped = v.reshape(n_kv, -1, head_dim)
    return {"amax": grouped.amax, "amin": grouped.amin, "mean": grouped.mean}[reduce](1).reshape(-1)


@torch.no_grad()
def scale_pair(block: nn.Module, pair: LinearPair, s: torch.Tensor, head_dim: int) -> None:
    """Make `nexts` read x / s: divide `prev`'s output rows (and bias) by s, multiply `nexts`' columns by s."""
    _check_scale(s, pair.prev)
    prev = block.get_submodule(pair.prev)
    _mul_(prev.weight, 1 / s[:, None])
    if prev.bias is not None:
        _mul_(prev.bias, 1 / s)
    s_next = pair_expand(block, pair, s, head_dim)
    for rel in pair.nexts:
        _mul_(block.get_submodule(rel).weight, s_next[None, :])


def _mul_(p: torch.Tensor, factor: torch.Tensor) -> None:
    p.data.copy_((p.data.float() * factor.float()).to(p.dtype))


def _check_scale(s: torch.Tensor, where: str) -> None:
    if not torch.isfinite(s).all() or (s == 0).any():
        raise LowbitError(f"per-channel scale for {where} has zero or non-finite entries; "
                          f"calibration data may be degenerate (check calibration.n_samples and the model)")

"""Float32 matrix products on the CPU through oneDNN instead of torch's default BLAS.

torch runs float32 `F.linear` and `@` on the CPU with MKL; oneDNN, also in every torch CPU build, picks its
kernels by instruction set and ran the embedded model's block products about twice as fast as MKL on an AMD EPYC
with AVX-512 (docs/scale.md, "A new machine, and oneDNN for float32 products").
The results equal torch's to float32 rounding, not bit for bit; each row's result does not depend on how
many rows are computed together (from 7 rows up), as with MKL. `LOWBIT_CPU_GEMM=torch` keeps torch's kernels.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

ENV = "LOWBIT_CPU_GEMM"
CHOICES = ("onednn", "torch")


def backend() -> str:
    """The float32 CPU GEMM in use: `onednn` (default, where torch has it) or `torch`."""
    choice = os.environ.get(ENV, "onednn")
    if choice not in CHOICES:
        raise LowbitError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}: unset it or pick one")
    return choice if torch.backends.mkldnn.is_available() else "torch"


def applies(*tensors: torch.Tensor | None) -> bool:
    """True where oneDNN computes this product: non-empty CPU float32 operands, no gradient to record."""
    ts = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() == 0 or t.numel() == 0 for t in ts):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    return backend() == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where it applies."""
    if applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def route_linears(model: nn.Module) -> None:
    """Give every `nn.Linear` of `model` a forward through `linear` (idempotent; other devices and dtypes, and
    products that record gradients, still run `F.linear`)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)

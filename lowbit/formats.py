"""Number formats and the primitive quantize / dequantize / fake-quantize functions.

A `QuantSpec` describes a format (integer or minifloat), its bit width, symmetry and granularity.
Quantization parameters are computed along the last axis of a "group view" of the tensor:
per-tensor -> one group, per-channel / per-token -> one group per row, per-group -> `group_size`
consecutive input columns. All functions are plain tensor functions, differentiable through a
straight-through estimator where rounding happens, so learned methods can train through them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "group", "token"]


@dataclass(frozen=True)
class FPFormat:
    """A minifloat: exponent and mantissa bits, exponent bias and largest finite value."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias


FP_FORMATS = {
    "e4m3": FPFormat("e4m3", 4, 3, 7, 448.0),
    "e5m2": FPFormat("e5m2", 5, 2, 15, 57344.0),
    "e2m1": FPFormat("e2m1", 2, 1, 1, 6.0),
}
_DEFAULT_FP = {8: "e4m3", 4: "e2m1"}


@dataclass(frozen=True)
class QuantSpec:
    """What a tensor is quantized to; validated on construction so impossible formats fail early."""

    bits: int = 4
    format: Literal["int", "fp"] = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    dynamic: bool = False
    fp_variant: str | None = None
    gguf: str | None = None  # a llama.cpp block type or mix ("q4_k", "q4_k_m"): see lowbit.gguf_types

    def __post_init__(self) -> None:
        if self.gguf is not None:
            from lowbit.gguf_types import apply_type
            apply_type(self)
        if self.format not in ("int", "fp"):
            raise LowbitError(f"unknown number format {self.format!r}: use 'int' or 'fp'")
        if self.format == "int" and not 2 <= self.bits <= 8:
            raise LowbitError(f"integer quantization supports 2 to 8 bits, got {self.bits}")
        if self.format == "fp":
            variant = self.fp_variant or _DEFAULT_FP.get(self.bits)
            if variant is None:
                raise LowbitError(
                    f"there is no {self.bits}-bit FP format: use bits 8 (e4m3, e5m2) or 4 (e2m1), or format 'int'")
            if variant not in FP_FORMATS or 1 + FP_FORMATS[variant].ebits + FP_FORMATS[variant].mbits != self.bits:
                raise LowbitError(f"FP variant {variant!r} is not a {self.bits}-bit format: "
                                  f"choose from {[k for k, v in FP_FORMATS.items() if 1 + v.ebits + v.mbits == self.bits]}")
            object.__setattr__(self, "fp_variant", variant)
            object.__setattr__(self, "symmetric", True)
        if self.granularity not in ("tensor", "channel", "group", "token"):
            raise LowbitError(f"unknown granularity {self.granularity!r}: use tensor, channel, group or token")
        if self.group_size is not None and self.granularity != "group":
            object.__setattr__(self, "granularity", "group")
        if self.granularity == "group" and (self.group_size is None or self.group_size <= 0):
            raise LowbitError("granularity 'group' needs a positive group_size (e.g. 64 or 128)")

    @property
    def fp(self) -> FPFormat | None:
        return FP_FORMATS[self.fp_variant] if self.format == "fp" else None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    def describe(self) -> str:
        if self.gguf is not None:
            return f"gguf {self.gguf.upper()}"
        kind = f"fp{self.bits}-{self.fp_variant}" if self.format == "fp" else f"int{self.bits}"
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "" if self.format == "fp" else ("sym" if self.symmetric else "asym")
        return " ".join(p for p in (kind, gran, sym, "dynamic" if self.dynamic else "") if p)


def check_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec, name: str = "tensor") -> None:
    """Raise a clear error if `spec` cannot be applied to a tensor of `shape` (e.g. group size not dividing the width)."""
    if spec.granularity == "group" and shape[-1] % spec.group_size:
        raise LowbitError(
            f"group size {spec.group_size} does not divide the width {shape[-1]} of {name}: "
            f"choose a divisor of {shape[-1]} (e.g. {_divisor_hint(shape[-1])}) or per-channel quantization")


def _divisor_hint(n: int) -> str:
    return ", ".join(str(g) for g in (32, 64, 128, 256) if n % g == 0) or "per-channel"


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape `x` so that each quantization group is one row of the last axis."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        check_shape(x.shape, spec)
        return x.reshape(-1, spec.group_size)
    return x.reshape(-1, x.shape[-1])


def params_shape(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """Natural shape of the scale tensor: [out, 1] per channel, [out, in/g] per group, [1] per tensor."""
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "group":
        return (*x.shape[:-1], x.shape[-1] // spec.group_size)
    return (*x.shape[:-1], 1)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping the range [lo, hi] (per group) onto the format's grid.

    Symmetric and FP formats have zero = 0; asymmetric integer formats get an integer zero point.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if spec.format == "fp":
        scale = torch.maximum(hi, -lo) / spec.fp.max
        return scale.clamp_min(tiny), torch.zeros_like(scale)
    if spec.symmetric:
        scale = torch.maximum(hi, -lo) / spec.qmax
        return scale.clamp_min(tiny), torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(tiny)
    zero = torch.clamp(torch.round(-lo / scale) + spec.qmin, spec.qmin, spec.qmax)
    return scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def round_minifloat(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Round already-scaled values to the nearest representable value of `fmt` (saturating), STE gradient."""
    xc = x.clamp(-fmt.max, fmt.max)
    exp = torch.floor(torch.log2(xc.abs().detach().clamp_min(1e-30))).clamp_min(fmt.min_normal_exp)
    step = torch.exp2(exp - fmt.mbits)
    return (xc + (torch.round(xc / step) * step - xc).detach()).clamp(-fmt.max, fmt.max)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int formats, as float tensor) or grid values in scaled units (FP formats)."""
    g = group_view(x, spec)
    s, z = scale.reshape(g.shape[0], -1), zero.reshape(g.shape[0], -1)
    if spec.format == "fp":
        q = round_minifloat(g / s, spec.fp)
    else:
        q = torch.clamp(round_ste(g / s + z) if spec.gguf else round_ste(g / s) + z, spec.qmin, spec.qmax)
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Map codes back to real values: (q - zero) * scale."""
    g = group_view(q, spec)
    s, z = scale.reshape(g.shape[0], -1), zero.reshape(g.shape[0], -1)
    return ((g - z) * s).reshape(q.shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, differentiable w.r.t. `x` (STE) and `scale` (LSQ-style)."""
    return dequantize(quantize(x, scale, zero, spec), scale, zero, spec)


def minmax_qparams(x: torch.Tensor, spec: QuantSpec, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters from each group's min and max (both scaled by `ratio` to clip), shaped as `params_shape`."""
    g = group_view(x.detach(), spec)
    scale, zero = qparams_from_range(g.amin(-1) * ratio, g.amax(-1) * ratio, spec)
    shape = params_shape(x, spec)
    return scale.reshape(shape), zero.reshape(shape)


def quantize_dynamic(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize with parameters computed from `x` itself (e.g. per-token activations at run time)."""
    scale, zero = minmax_qparams(x, spec)
    return fake_quant(x, scale, zero, spec)


def bits_per_weight(spec: QuantSpec, in_features: int, scale_bits: int = 16) -> float:
    """Storage cost per weight including scales (16-bit) and zero points (`bits` each, asymmetric only)."""
    per_group = {"tensor": math.inf, "channel": in_features, "token": in_features}.get(spec.granularity, spec.group_size)
    overhead = scale_bits + (0 if spec.symmetric or spec.format == "fp" else spec.bits)
    return spec.bits + (0.0 if per_group == math.inf else overhead / per_group)

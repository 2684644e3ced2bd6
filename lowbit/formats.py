"""Number formats and the primitive quantize / dequantize / fake-quantize functions.

A `QuantSpec` describes a format (integer or minifloat), its bit width, symmetry, granularity and, for
the microscaling formats, how its block scales are stored. Quantization parameters are computed along
the last axis of a "group view" of the tensor: per-tensor -> one group, per-channel / per-token -> one
group per row, per-group -> `group_size` consecutive input columns, per-block -> one 2-D tile of
`block` = (rows, columns) (edge tiles may be partial, as compressed-tensors pads them). All functions
are plain tensor functions, differentiable through a straight-through estimator where rounding happens,
so learned methods can train through them.

Block-scale rules: "e8m0" scales are powers of two chosen by the OCP MX v1.0 rule
2^(floor(log2(amax)) - emax_elem) (values above the element format's max saturate); "e4m3" scales are
FP8 numbers under a per-tensor FP32 global scale gs = 448 * max_elem / amax_tensor (NVFP4): the stored
block scale is e4m3(amax_block / max_elem * gs) and the effective scale that value / gs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "group", "token", "block"]
ScaleFormat = Literal["e8m0", "e4m3"]


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
E8M0_EXP_RANGE = (-127, 127)  # exponents an E8M0 scale holds (255 is NaN)
E4M3_MIN_SUBNORMAL = 2.0 ** -9

# microscaling formats by name: what `format: mxfp4` in a recipe means
NAMED_FORMATS: dict[str, dict] = {
    "mxfp4": dict(bits=4, format="fp", fp_variant="e2m1", granularity="group", group_size=32, scale_format="e8m0"),
    "nvfp4": dict(bits=4, format="fp", fp_variant="e2m1", granularity="group", group_size=16, scale_format="e4m3"),
    "mxfp8": dict(bits=8, format="fp", fp_variant="e4m3", granularity="group", group_size=32, scale_format="e8m0"),
}
_SPEC_FIELDS = ("bits", "format", "symmetric", "granularity", "group_size", "dynamic", "fp_variant", "block",
                "scale_format", "gguf")


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
    block: tuple[int, int] | None = None  # 2-D tile (rows, columns) sharing one scale; implies granularity "block"
    scale_format: ScaleFormat | None = None  # None: scales kept at the export dtype (bf16 / fp16)
    gguf: str | None = None  # a llama.cpp block type or mix ("q4_k", "q4_k_m"): see lowbit.gguf_types

    def __post_init__(self) -> None:
        if self.gguf is not None:
            from lowbit.gguf_types import apply_type
            apply_type(self)
        if self.format not in ("int", "fp"):
            raise LowbitError(f"unknown number format {self.format!r}: use 'int', 'fp' or one of {', '.join(NAMED_FORMATS)}")
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
        if self.granularity not in ("tensor", "channel", "group", "token", "block"):
            raise LowbitError(f"unknown granularity {self.granularity!r}: use tensor, channel, group, token or block")
        if self.group_size is not None and self.block is not None:
            raise LowbitError("give either group_size (groups along a row) or block (2-D tiles), not both")
        # the one place where a group size implies group granularity (and a block shape block granularity)
        if self.group_size is not None and self.granularity != "group":
            object.__setattr__(self, "granularity", "group")
        if self.block is not None:
            block = tuple(self.block)
            if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
                raise LowbitError(f"block must be two positive integers [rows, columns] (e.g. [128, 128]), got {self.block}")
            object.__setattr__(self, "block", block)
            object.__setattr__(self, "granularity", "block")
        if self.granularity == "group" and (self.group_size is None or self.group_size <= 0):
            raise LowbitError("granularity 'group' needs a positive group_size (e.g. 64 or 128)")
        if self.granularity == "block" and self.block is None:
            raise LowbitError("granularity 'block' needs a block shape [rows, columns] (e.g. [128, 128])")
        if self.scale_format is not None:
            if self.scale_format not in ("e8m0", "e4m3"):
                raise LowbitError(f"unknown scale format {self.scale_format!r}: use e8m0 or e4m3")
            if self.format != "fp":
                raise LowbitError(f"{self.scale_format} block scales are defined for FP elements: use format fp")

    @property
    def fp(self) -> FPFormat | None:
        return FP_FORMATS[self.fp_variant] if self.format == "fp" else None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def name(self) -> str | None:
        """The named microscaling format this spec is (mxfp4, nvfp4, mxfp8), or None."""
        fields = {k: getattr(self, k) for k in _SPEC_FIELDS}
        return next((n for n, f in NAMED_FORMATS.items() if all(fields[k] == v for k, v in f.items())), None)

    @property
    def element_key(self) -> str:
        """The element type: 'int4', 'fp8-e4m3', ..."""
        return f"fp{self.bits}-{self.fp_variant}" if self.format == "fp" else f"int{self.bits}"

    @property
    def granularity_key(self) -> str:
        """'per-channel', 'group 128', 'block 128x128', ..."""
        if self.granularity == "group":
            return f"group {self.group_size}"
        if self.granularity == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        return f"per-{self.granularity}"

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    def row_spec(self) -> "QuantSpec":
        """The same format with one parameter per row (what per-row searches and column-wise solvers round with)."""
        return replace(self, granularity="channel", group_size=None, block=None)

    def describe(self) -> str:
        """One short line naming the format, e.g. 'int4 g64 asym', 'mxfp4', 'fp8-e4m3 block 128x128', 'gguf Q4_K'."""
        if self.gguf is not None:
            return f"gguf {self.gguf.upper()}"
        if self.name is not None:
            return self.name + (" dynamic" if self.dynamic else "")
        gran = {"group": f"g{self.group_size}", "block": f"block {self.block[0]}x{self.block[1]}" if self.block else ""
                }.get(self.granularity, self.granularity)
        sym = "" if self.format == "fp" else ("sym" if self.symmetric else "asym")
        scales = f"{self.scale_format} scales" if self.scale_format else ""
        return " ".join(p for p in (self.element_key, gran, sym, scales, "dynamic" if self.dynamic else "") if p)

    def to_dict(self) -> dict:
        """Plain JSON-able fields (what quant_state.json stores); `from_dict` reverses it."""
        d = {k: getattr(self, k) for k in _SPEC_FIELDS}
        d["block"] = list(self.block) if self.block else None
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        return cls(**{k: v for k, v in data.items() if k in _SPEC_FIELDS})

    @classmethod
    def named(cls, name: str, **changes) -> "QuantSpec":
        """A named microscaling format (mxfp4, nvfp4, mxfp8), with e.g. dynamic=True for activations."""
        if name not in NAMED_FORMATS:
            raise LowbitError(f"unknown format {name!r}: choose from int, fp, {', '.join(NAMED_FORMATS)}")
        return cls(**{**NAMED_FORMATS[name], **changes})


def check_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec, name: str = "tensor") -> None:
    """Raise a clear error if `spec` cannot be applied to a tensor of `shape` (e.g. group size not dividing the width)."""
    if spec.granularity == "group" and shape[-1] % spec.group_size:
        raise LowbitError(
            f"group size {spec.group_size} does not divide the width {shape[-1]} of {name}: "
            f"choose a divisor of {shape[-1]} (e.g. {_divisor_hint(shape[-1])}) or per-channel quantization")
    if spec.granularity == "block" and len(shape) != 2:
        raise LowbitError(f"block quantization applies to 2-D weights, not the {len(shape)}-D {name}")


def _divisor_hint(n: int) -> str:
    return ", ".join(str(g) for g in (16, 32, 64, 128, 256) if n % g == 0) or "per-channel"


def _block_grid(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, int]:
    """Number of block rows and columns (edge blocks partial)."""
    (bh, bw), (rows, cols) = spec.block, shape
    return -(-rows // bh), -(-cols // bw)


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape `x` so that each quantization group is one row of the last axis (blocks zero-padded to full size)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        check_shape(x.shape, spec)
        return x.reshape(-1, spec.group_size)
    if spec.granularity == "block":
        check_shape(x.shape, spec)
        (bh, bw), (nr, nc) = spec.block, _block_grid(x.shape, spec)
        padded = torch.nn.functional.pad(x, (0, nc * bw - x.shape[1], 0, nr * bh - x.shape[0]))
        return padded.reshape(nr, bh, nc, bw).transpose(1, 2).reshape(nr * nc, bh * bw)
    return x.reshape(-1, x.shape[-1])


def params_shape(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """Natural shape of the scale tensor: [out, 1] per channel, [out, in/g] per group, [1] per tensor,
    [ceil(out/bh), ceil(in/bw)] per block."""
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "group":
        return (*x.shape[:-1], x.shape[-1] // spec.group_size)
    if spec.granularity == "block":
        return _block_grid(x.shape, spec)
    return (*x.shape[:-1], 1)


def expand_params(p: torch.Tensor, spec: QuantSpec, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A scale or zero point (shaped `params_shape`) repeated to one value per element of a tensor of `shape`."""
    if spec.granularity == "block":
        (bh, bw), (rows, cols) = spec.block, shape
        return p.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
    rows, length = group_view(torch.empty(shape, device="meta"), spec).shape
    return p.reshape(rows, 1).expand(rows, length).reshape(shape)


def global_scale(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's per-tensor FP32 scale from the tensor's (or fused tensors') largest magnitude; None for other formats.

    gs = 448 * max_elem / amax, so the largest block scale lands on e4m3's largest value (compressed-tensors' rule).
    """
    if spec.scale_format != "e4m3":
        return None
    amax = amax.detach().float().reshape(1).clamp_min(torch.finfo(torch.float32).tiny)
    return FP_FORMATS["e4m3"].max * spec.fp.max / amax


def block_scale(amax: torch.Tensor, spec: QuantSpec, gs: torch.Tensor | None = None) -> torch.Tensor:
    """Effective float32 scale of each block with largest magnitude `amax`, rounded as the format stores it.

    e8m0 (OCP MX v1.0): 2^(floor(log2(amax)) - emax_elem), emax_elem = floor(log2(max_elem)) (2 for e2m1, 8 for
    e4m3); the exponent is floored, so magnitudes above max_elem * scale saturate. e4m3 (NVFP4):
    e4m3(amax / max_elem * gs) / gs, rounded to nearest, at least e4m3's smallest subnormal (so an all-zero block
    keeps a usable scale).
    """
    if spec.scale_format == "e8m0":
        emax = math.floor(math.log2(spec.fp.max))
        return torch.exp2((torch.floor(torch.log2(amax)) - emax).clamp(*E8M0_EXP_RANGE))
    if spec.scale_format == "e4m3":
        if gs is None:
            raise ValueError("e4m3 block scales need the per-tensor global scale")
        code = round_minifloat((amax / spec.fp.max * gs).clamp_min(E4M3_MIN_SUBNORMAL), FP_FORMATS["e4m3"])
        return code.detach() / gs
    raise ValueError(f"{spec.describe()} has no block-scale format")


def on_scale_grid(scale: torch.Tensor, spec: QuantSpec, gs: torch.Tensor | None = None) -> bool:
    """True if every scale is one the format stores: a power of two (e8m0), an e4m3 value times 1/gs (e4m3)."""
    if spec.scale_format == "e8m0":
        return bool((torch.log2(scale) == torch.log2(scale).round()).all())
    if spec.scale_format == "e4m3":
        stored = scale.detach().float() * gs
        return torch.allclose(round_minifloat(stored, FP_FORMATS["e4m3"]), stored, rtol=1e-5, atol=0)
    return True


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                       gs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping the range [lo, hi] (per group) onto the format's grid.

    Symmetric and FP formats have zero = 0; asymmetric integer formats get an integer zero point. Block-scaled
    FP formats round the scale as the format stores it (`block_scale`; `gs`: NVFP4's per-tensor scale).
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if spec.format == "fp":
        amax = torch.maximum(hi, -lo)
        if spec.scale_format:
            return block_scale(amax, spec, gs), torch.zeros_like(amax)
        return (amax / spec.fp.max).clamp_min(tiny), torch.zeros_like(amax)
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
    """Round already-scaled values to the nearest representable value of `fmt` (saturating, ties to even), STE gradient."""
    xc = x.clamp(-fmt.max, fmt.max)
    exp = torch.floor(torch.log2(xc.abs().detach().clamp_min(1e-30))).clamp_min(fmt.min_normal_exp)
    step = torch.exp2(exp - fmt.mbits)
    return (xc + (torch.round(xc / step) * step - xc).detach()).clamp(-fmt.max, fmt.max)


def _to_grid(v: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.format == "fp":
        return round_minifloat(v, spec.fp)
    return torch.clamp(round_ste(v + z) if spec.gguf else round_ste(v) + z, spec.qmin, spec.qmax)  # GGUF: real zeros


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int formats, as float tensor) or grid values in scaled units (FP formats)."""
    if spec.granularity == "block":
        return _to_grid(x / expand_params(scale, spec, x.shape), expand_params(zero, spec, x.shape), spec)
    g = group_view(x, spec)
    s, z = scale.reshape(g.shape[0], -1), zero.reshape(g.shape[0], -1)
    return _to_grid(g / s, z, spec).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Map codes back to real values: (q - zero) * scale."""
    if spec.granularity == "block":
        return (q - expand_params(zero, spec, q.shape)) * expand_params(scale, spec, q.shape)
    g = group_view(q, spec)
    s, z = scale.reshape(g.shape[0], -1), zero.reshape(g.shape[0], -1)
    return ((g - z) * s).reshape(q.shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, differentiable w.r.t. `x` (STE) and `scale` (LSQ-style)."""
    return dequantize(quantize(x, scale, zero, spec), scale, zero, spec)


def minmax_qparams(x: torch.Tensor, spec: QuantSpec, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters from each group's min and max (both scaled by `ratio` to clip), shaped as `params_shape`."""
    g = group_view(x.detach(), spec)
    lo, hi = g.amin(-1) * ratio, g.amax(-1) * ratio
    scale, zero = qparams_from_range(lo, hi, spec, global_scale(torch.maximum(hi.abs().max(), lo.abs().max()), spec))
    shape = params_shape(x, spec)
    return scale.reshape(shape), zero.reshape(shape)


def quantize_dynamic(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize with parameters computed from `x` itself (e.g. per-token activations at run time)."""
    scale, zero = minmax_qparams(x, spec)
    return fake_quant(x, scale, zero, spec)


GRID_TOLERANCE = 0.01  # largest |w - dequantized code| accepted when recovering codes, in local grid steps


@torch.no_grad()
def recover_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                  name: str = "weight") -> torch.Tensor:
    """The codes of a dequantized weight (integers, or FP grid values in units of the scale); what export and the
    CPU kernels pack. Refuses a weight that is off its grid by more than GRID_TOLERANCE of the local grid step
    (plus bfloat16 rounding of the weight itself, for runs saved in bfloat16), since its codes would not
    reproduce the simulated model."""
    w = weight.detach().float()
    scale, zero = scale.float(), zero.float()
    q = quantize(w, scale, zero, spec)
    err = (dequantize(q, scale, zero, spec) - w).abs()
    step = expand_params(scale.reshape(params_shape(w, spec)), spec, w.shape)
    if spec.format == "fp":  # an FP grid's step depends on the code's binade
        exp = torch.floor(torch.log2(q.abs().clamp_min(1e-30))).clamp_min(spec.fp.min_normal_exp)
        step = step * torch.exp2(exp - spec.fp.mbits)
    off = err / step
    if (err > GRID_TOLERANCE * step + 2.0 ** -8 * w.abs()).any():
        raise LowbitError(f"the weight of {name} is off its quantization grid by {off.max().item():.3f} steps: the "
                          f"model was changed after quantization (rerun it) or loaded below float32 precision")
    return q


def scale_bits(spec: QuantSpec, export_bits: int = 16) -> int:
    """Bits one stored scale takes: 8 for e8m0 / e4m3 block scales, else the export dtype's."""
    return 8 if spec.scale_format else export_bits


def storage_bits(spec: QuantSpec, shape: tuple[int, ...], export_bits: int = 16) -> float:
    """Bits to store a weight of `shape`: codes, every scale (partial edge blocks included), zero points
    (`bits` each, asymmetric integers only) and NVFP4's FP32 per-tensor scale."""
    numel = math.prod(shape)
    if spec.gguf is not None:  # a GGUF block type's exact size
        from lowbit.gguf_types import grid_type
        return numel * grid_type(spec).bits_per_weight
    n_params = math.prod(params_shape(torch.empty(shape, device="meta"), spec))
    zero_bits = 0 if spec.symmetric or spec.format == "fp" else spec.bits
    tensor_bits = 32 if spec.scale_format == "e4m3" else 0
    return numel * spec.bits + n_params * (scale_bits(spec, export_bits) + zero_bits) + tensor_bits

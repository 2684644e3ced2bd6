"""llama.cpp's GGUF block types as lowbit grids, so solvers round onto exactly what llama.cpp runs.

Every type quantizes a row in blocks (sub-blocks for K-quants) with one scale each, and a min for the
asymmetric ones: x = d_j * q - m_j. Legacy types (Q4_0, Q5_0, Q5_1, Q8_0) store d_j (and m_j) in fp16.
K-quants group 256 values in a super-block that stores one fp16 `d` (and `dmin`) and small integer
sub-block scales (and mins): d_j = d * sc_j, m_j = dmin * mn_j, with sc/mn on 4, 6 or 8 bits.
In lowbit terms a type is an integer QuantSpec grouped by the sub-block, whose scale is d_j and whose
zero is m_j / d_j (a real number for asymmetric types: codes are round(x / scale + zero)).
A row whose length is not a multiple of 256 cannot hold super-blocks: llama.cpp's quantizer then uses
a fallback type for that tensor, and so does `resolve`. Mixes (Q4_K_M, ...) pick a type per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

SUPER_BLOCK = 256


@dataclass(frozen=True)
class GGUFType:
    """One GGUF block type: code bits, symmetry, sub-block length and how its scales are stored."""

    name: str  # llama.cpp's name, e.g. "Q4_K"
    bits: int
    symmetric: bool
    block: int  # values sharing one scale (and min)
    scale_bits: int | None = None  # K-quants: bits of the integer sub-block scales/mins; None: fp16 per block
    fallback: str | None = None  # type for rows that are not a multiple of 256 (K-quants only)

    @property
    def super_block(self) -> int:
        return SUPER_BLOCK if self.scale_bits else self.block

    @property
    def bits_per_weight(self) -> float:
        """Bytes of one stored (super-)block, in bits per value (Q4_K: 144 bytes / 256 values = 4.5)."""
        import gguf

        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.name]]
        return nbytes * 8 / block

    @property
    def scale_max(self) -> int:
        """Largest integer sub-block scale (and min): signed scales for symmetric types, unsigned otherwise."""
        return 2 ** (self.scale_bits - 1) - 1 if self.symmetric else 2 ** self.scale_bits - 1


# Fallbacks follow llama.cpp's quantizer (llama-quant.cpp) except Q2_K/Q3_K, which fall back to IQ4_NL there,
# a non-uniform grid lowbit does not solve on: they fall back to Q4_0 here.
TYPES = {t.name.lower(): t for t in (
    GGUFType("Q4_0", 4, True, 32),
    GGUFType("Q5_0", 5, True, 32),
    GGUFType("Q8_0", 8, True, 32),
    GGUFType("Q4_1", 4, False, 32),
    GGUFType("Q5_1", 5, False, 32),
    GGUFType("Q2_K", 2, False, 16, 4, "q4_0"),
    GGUFType("Q3_K", 3, True, 16, 6, "q4_0"),
    GGUFType("Q4_K", 4, False, 32, 6, "q5_0"),
    GGUFType("Q5_K", 5, False, 32, 6, "q5_1"),
    GGUFType("Q6_K", 6, True, 16, 8, "q8_0"),
)}


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file-type mix: `base` everywhere, `more` for attn_v and ffn_down in the layers it favours."""

    name: str
    base: str
    more: str


MIXES = {m.name.lower(): m for m in (Mix("Q4_K_M", "q4_k", "q6_k"), Mix("Q5_K_M", "q5_k", "q6_k"))}


def names() -> list[str]:
    return [*TYPES, *MIXES]


def base_type(name: str) -> GGUFType:
    """The type a name stands for (a mix: its base type); a one-line error for unknown names."""
    key = name.lower()
    if key in MIXES:
        key = MIXES[key].base
    if key not in TYPES:
        raise LowbitError(f"unknown GGUF type {name!r}: choose from {', '.join(names())}")
    return TYPES[key]


def uses_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers a _M mix gives more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def resolve(name: str, gguf_name: str, layer: int, n_layers: int, width: int) -> str:
    """The concrete type a tensor gets: the mix's choice for its GGUF name and layer, then the width fallback."""
    key = name.lower()
    if key in MIXES:
        mix = MIXES[key]
        more = gguf_name in ("attn_v", "ffn_down") and uses_more_bits(layer, n_layers)
        key = mix.more if more else mix.base
    gtype = TYPES[key]
    if width % gtype.super_block:
        if gtype.fallback is None or width % TYPES[gtype.fallback].super_block:
            also = f" (or of 32 for its fallback {gtype.fallback.upper()})" if gtype.fallback else ""
            raise LowbitError(f"GGUF {gtype.name} needs rows that are a multiple of {gtype.super_block}{also}, "
                              f"got a row of {width}: choose a type whose blocks divide it")
        return gtype.fallback
    return key


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (as float32), never to zero: the smallest fp16 subnormal stands in for an all-zero block."""
    return x.clamp_min(2.0 ** -24).to(torch.float16).float()


def _super(x: torch.Tensor, gtype: GGUFType) -> torch.Tensor:
    """[..., n_sub] -> [..., n_super, subs per super-block]."""
    return x.reshape(*x.shape[:-1], -1, gtype.super_block // gtype.block)


def _int_scales(s: torch.Tensor, gtype: GGUFType) -> torch.Tensor:
    """Sub-block values `s` >= 0 as d * k with k integer in [0, scale_max] and d fp16 per super-block.

    The largest sub-block of each super-block gets k = scale_max exactly, so d = max / scale_max can be
    read back from the result (the exporter does).
    """
    top = gtype.scale_max
    sb = _super(s, gtype)
    peak = sb.amax(-1, keepdim=True)
    d = _fp16(peak / top)
    k = torch.where(sb == peak, torch.full_like(sb, top), torch.round(sb / d).clamp(0, top))
    return (d * k).reshape(s.shape)


def block_params(lo: torch.Tensor, hi: torch.Tensor, gtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per sub-block, [rows, n_sub], from each sub-block's range [lo, hi] (0 included).

    Asymmetric: scale = (hi - lo) / (2^bits - 1) and min = -lo, each stored as the type stores them;
    zero = min / scale. Symmetric: scale = max|x| / (2^(bits-1) - 1), zero = 0. A sub-block scale of 0
    (no integer scale small enough) is lifted to the smallest the super-block can store, so codes stay finite.
    """
    lo, hi = lo.float().clamp_max(0), hi.float().clamp_min(0)
    if gtype.symmetric:
        s = torch.maximum(hi, -lo) / (2 ** (gtype.bits - 1) - 1)
    else:
        s = (hi - lo) / (2 ** gtype.bits - 1)
    if gtype.scale_bits is None:
        scale = _fp16(s)
        zero = torch.zeros_like(scale) if gtype.symmetric else (-lo).to(torch.float16).float() / scale
        return scale, zero
    scale = _int_scales(s, gtype)
    unit = _super(scale, gtype).amax(-1, keepdim=True) / gtype.scale_max
    scale = torch.maximum(_super(scale, gtype), unit).reshape(scale.shape)
    if gtype.symmetric:
        return scale, torch.zeros_like(scale)
    any_min = _super(-lo, gtype).amax(-1, keepdim=True) > 0
    mins = torch.where(any_min, _super(_int_scales(-lo, gtype), gtype), 0.0).reshape(lo.shape)
    return scale, mins / scale


@dataclass(frozen=True)
class SuperBlockParams:
    """A K-quant tensor's stored parameters recovered from scale/zero: fp16 d/dmin, integer scales/mins."""

    d: torch.Tensor  # [rows, n_super]
    sc: torch.Tensor  # [rows, n_sub] integers
    dmin: torch.Tensor  # [rows, n_super] (zeros for symmetric types)
    mn: torch.Tensor  # [rows, n_sub] integers (zeros for symmetric types)


def split_params(scale: torch.Tensor, zero: torch.Tensor, gtype: GGUFType, name: str) -> SuperBlockParams:
    """Read back d, integer scales, dmin and integer mins from a K-quant grid's scale and zero (see `block_params`)."""
    top = gtype.scale_max
    s = _super(scale.float(), gtype)
    d = s.amax(-1, keepdim=True) / top
    sc = s / d
    m = _super((zero * scale).float(), gtype)
    dmin = (m.amax(-1, keepdim=True) / top).to(torch.float16).float()
    mn = torch.where(dmin > 0, m / dmin.clamp_min(2.0 ** -24), torch.zeros_like(m))
    bad = ((sc - sc.round()).abs() > 1e-3).any() or ((mn - mn.round()).abs() > 1e-2).any() \
        or (d.to(torch.float16).float() != d).any()
    if bad:
        raise LowbitError(f"the scales of {name} are not on the {gtype.name} grid (integer sub-block scales times "
                          f"an fp16 super-block scale): the run folder is inconsistent; rerun it")
    rows = scale.shape[0]
    return SuperBlockParams(d.reshape(rows, -1), sc.round().reshape(rows, -1), dmin.reshape(rows, -1),
                            mn.round().reshape(rows, -1))


def apply_type(spec) -> None:
    """Validate a QuantSpec naming a GGUF type and set its integer format from the type (QuantSpec calls this)."""
    gtype = base_type(spec.gguf)
    if spec.granularity == "group" and spec.group_size not in (None, gtype.block):
        raise LowbitError(f"GGUF {gtype.name} quantizes in groups of {gtype.block}, not {spec.group_size}: "
                          f"drop group_size from a gguf format")
    for key, value in (("gguf", spec.gguf.lower()), ("format", "int"), ("bits", gtype.bits),
                       ("symmetric", gtype.symmetric), ("fp_variant", None)):
        object.__setattr__(spec, key, value)
    if spec.granularity == "group" or spec.group_size is not None:
        object.__setattr__(spec, "granularity", "group")
        object.__setattr__(spec, "group_size", gtype.block)


def type_spec(name: str):
    """The QuantSpec of a GGUF type or mix: integers grouped by its (sub-)block."""
    from lowbit.formats import QuantSpec

    return QuantSpec(gguf=name, granularity="group", group_size=base_type(name).block)


def grid_type(spec) -> GGUFType:
    """The concrete block type of a resolved spec; a mix must be resolved per tensor first (`resolve`)."""
    if spec.gguf not in TYPES:
        raise LowbitError(f"GGUF mix {spec.gguf!r} picks a type per tensor: quantize through the pipeline, which "
                          f"resolves it for each linear")
    return TYPES[spec.gguf]

"""Packed low-bit linear layers running on PyTorch's CPU kernels; each computes what its simulated layer computes.

The simulated model stores dequantized weights w = (q - zero) * scale. These modules store the integer codes q
instead and multiply with them directly: int8 weight-only (`_weight_int8pack_mm`), int4 weight-only in groups
(`_weight_int4pack_mm_for_cpu`), int8 activations x int8 weights (`torch._int_mm`), or dequantize-then-matmul
for formats no kernel takes. Inputs may have any leading shape; the matmul runs on the flattened rows.

What the ops require in PyTorch 2.13 (checked on this CPU build): `_weight_int8pack_mm(x [M,K], codes int8 [N,K],
scales [N])` takes one scale per output row. `_convert_weight_to_int4pack_for_cpu(u int32 [N,K] in [0,15], 1)`
needs N divisible by 16 and `_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group, N, 2])`
needs group in {32, 64, 128, 256} dividing K, and dequantizes w = (u - 8) * scale + zero. Both accept float32,
bfloat16 and float16 inputs, but only bfloat16 takes a vectorized path (float32 is many times slower at 128 rows,
see `lowbit bench layers`). `torch._int_mm(a int8 [M,K], b int8 [K,N])` accepted every shape we tried on the CPU
(M = 1, 5, 17; odd K and N), so no padding is needed there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.formats import QuantSpec, dequantize, minmax_qparams, quantize

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest first
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs the output width divisible by 16


class PackedLinear(nn.Module):
    """Common shape handling and bias; subclasses implement `matmul` on a 2-D input."""

    kernel = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8WeightLinear(PackedLinear):
    """Per-channel int8 weights: y = (x @ codes^T) * scale - sum(x) * offset.

    The matmul runs in the dtype of `scale` (the compute dtype: bfloat16 takes PyTorch's vectorized path, float32
    a slow exact one); the result is cast back to the input's dtype.

    codes = q - center fits int8; center is the zero point (symmetric, or asymmetric up to 7 bits) or 128
    (8-bit asymmetric, where q - zero can reach +-255); offset = (zero - center) * scale restores the shift.
    """

    kernel = "int8 weight-only (_weight_int8pack_mm)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", offset)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(self.scale.dtype).contiguous(), self.codes, self.scale).to(x.dtype)
        if self.offset is not None:
            y = y - x.sum(-1, keepdim=True) * self.offset.to(x.dtype)
        return y


class Int4WeightLinear(PackedLinear):
    """Grouped 4-bit weights in the tinygemm layout: w = (u - 8) * scale + zero per group, u in [0, 15].

    Output rows are padded to a multiple of 16 for the packing op and sliced off after the matmul. As for int8,
    the matmul runs in the dtype of `scales_and_zeros` and the result is cast back.
    """

    kernel = "int4 weight-only (_weight_int4pack_mm_for_cpu)"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.scales_and_zeros.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.group_size, self.scales_and_zeros)
        return y[:, : self.out_features].to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class W8A8Linear(PackedLinear):
    """Integer activations times integer weights: the input is quantized per token (or with a static scale)
    exactly as its `ActQuantizer` would, then y = int_mm(codes_x, codes_w^T) * scale_x * scale_w."""

    kernel = "int8 x int8 (torch._int_mm)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, act: ActQuantizer, bias: torch.Tensor | None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        self.register_buffer("codes_t", codes.to(torch.int8).t())
        self.register_buffer("scale", scale.contiguous())
        self.act = act

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        spec: QuantSpec = self.act.spec
        if spec.dynamic or self.act.scale is None:
            sx, zx = minmax_qparams(x, spec, self.act.clip_ratio)
        else:
            sx, zx = self.act.scale.to(x.dtype), self.act.zero.to(x.dtype)
        q = quantize(x, sx, zx, spec)
        codes = (q - zx.reshape(-1, 1)).to(torch.int8)
        acc = torch._int_mm(codes, self.codes_t)
        return acc.to(self.scale.dtype) * (sx.reshape(-1, 1).to(self.scale.dtype) * self.scale)


class DequantLinear(PackedLinear):
    """Fallback for formats no kernel takes: keeps integer codes, dequantizes on every call, float matmul."""

    kernel = "dequantize + matmul (fallback)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                 dtype: torch.dtype, bias: torch.Tensor | None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        fits_int8 = spec.qmin >= -128 and spec.qmax <= 127
        self.spec = spec
        self.dtype = dtype
        self.register_buffer("codes", codes.to(torch.int8 if fits_int8 else torch.uint8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("zero", zero.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.codes.to(self.dtype), self.scale, self.zero, self.spec)
        return F.linear(x.to(self.dtype), w)

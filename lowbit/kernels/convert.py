"""Turn a simulated-quantization model into one with packed weights on real CPU kernels.

For every quantized linear of a run's `QuantState`, the integer codes are recovered from the model's dequantized
weight (codes = round(w / scale) + zero, checked to lie on the grid) and the fastest kernel that represents the
format exactly is chosen: int8 x int8 when the input has an int8-compatible activation quantizer and the weight
is per-channel, int4 weight-only for <=4-bit weights whose groups tile into 32/64/128/256, int8 weight-only for
other per-channel weights up to 8 bits, and dequantize-then-matmul for the rest. Online transforms, output
quantizers and activation quantizers a kernel does not absorb stay attached as in the simulated model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, expand_params
from lowbit.kernels.linear import (INT4_GROUPS, INT4_N_MULTIPLE, DequantLinear, Int4WeightLinear, Int8WeightLinear,
                                   W8A8Linear)
from lowbit.state import QuantState, WeightRecord

@dataclass(frozen=True)
class LayerKernel:
    """Which kernel one linear runs on, and how its input activations are quantized."""

    name: str
    kernel: str
    weight: str
    activations: str
    compute: str
    note: str = ""


def int8_activations(act: ActQuantizer | None) -> bool:
    """True if the quantizer gives integer codes that fit int8 with one scale per row (per token or tensor)."""
    if act is None or not act.enabled:
        return False
    spec = act.spec
    return (spec.format == "int" and spec.bits <= 8 and (spec.symmetric or spec.bits <= 7)
            and spec.granularity in ("token", "channel", "tensor"))


def int4_group(spec: QuantSpec, in_features: int) -> int | None:
    """Kernel group size that tiles the weight's groups exactly (a per-channel scale repeats across groups)."""
    if spec.format != "int" or spec.bits > 4:
        return None
    length = spec.group_size if spec.granularity == "group" else in_features
    return next((g for g in INT4_GROUPS if length % g == 0 and in_features % g == 0), None)


def _row_params(rec: WeightRecord, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale and zero point [out] of a per-channel or per-tensor weight."""
    scale = expand_params(rec.scale.float(), rec.spec, shape)[:, 0]
    zero = expand_params(rec.zero.float(), rec.spec, shape)[:, 0]
    return scale, zero


def build_int8(q: torch.Tensor, rec: WeightRecord, dtype: torch.dtype, bias) -> Int8WeightLinear:
    scale, zero = _row_params(rec, q.shape)
    center = zero if rec.spec.symmetric or rec.spec.bits <= 7 else torch.full_like(zero, 128.0)
    offset = (zero - center) * scale
    return Int8WeightLinear((q - center[:, None]).to(torch.int8), scale.to(dtype), offset if offset.any() else None,
                            bias)


def build_int4(q: torch.Tensor, rec: WeightRecord, group: int, dtype: torch.dtype, bias) -> Int4WeightLinear:
    """Kernel codes u = q + shift in [0, 15] (shift 8 if symmetric, else 0), so that
    w = (q - z) * s = (u - 8) * s + (8 - shift - z) * s: the kernel's scale s and additive zero (8 - shift - z) * s."""
    n, k = q.shape
    shift = 8 if rec.spec.symmetric else 0
    scale = expand_params(rec.scale.float(), rec.spec, q.shape)[:, ::group]
    zero = expand_params(rec.zero.float(), rec.spec, q.shape)[:, ::group]
    u = (q + shift).to(torch.int32)
    pad = -n % INT4_N_MULTIPLE
    if pad:
        u = torch.cat([u, torch.full((pad, k), 8, dtype=torch.int32)])
        scale = torch.cat([scale, torch.zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, torch.zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    sz = torch.stack([scale.t(), ((8 - shift - zero) * scale).t()], dim=-1).to(dtype)
    return Int4WeightLinear(packed, sz, group, k, n, bias)


def build_w8a8(q: torch.Tensor, rec: WeightRecord, act: ActQuantizer, dtype: torch.dtype, bias) -> W8A8Linear:
    scale, zero = _row_params(rec, q.shape)
    return W8A8Linear((q - zero[:, None]).to(torch.int8), scale.to(dtype), act, bias)


def real_linear(name: str, linear: nn.Linear, rec: WeightRecord, act: ActQuantizer | None,
                compute_dtype: torch.dtype | None = None) -> tuple[nn.Module, LayerKernel]:
    """The packed module replacing `linear` and the report line saying which kernel it uses and why.

    Weight-only kernels multiply in `compute_dtype` (default: the weight's dtype); int8 x int8 and the fallback
    always use the weight's dtype.
    """
    spec, dtype = rec.spec, linear.weight.dtype
    compute_dtype = compute_dtype or dtype
    bias = linear.bias
    act_desc = act.spec.describe() if act is not None and act.enabled else "fp"
    if spec.format != "int":
        return linear, LayerKernel(name, "dense (unchanged)", spec.describe(), act_desc + " (simulated)",
                                   _dtype_name(dtype), "no integer kernel for minifloat weights")
    q = rec.codes(linear.weight, name)
    per_row = spec.granularity in ("channel", "tensor")
    centered_int8 = spec.symmetric or spec.bits <= 7
    if per_row and centered_int8 and int8_activations(act):
        module = build_w8a8(q, rec, act, dtype, bias)
        return module, LayerKernel(name, module.kernel, spec.describe(), act_desc + " (in kernel)", "int8 -> int32")
    act_note = act_desc if act_desc == "fp" else act_desc + " (simulated)"
    group = int4_group(spec, linear.in_features)
    if group is not None:
        module = build_int4(q, rec, group, compute_dtype, bias)
        note = "" if spec.bits == 4 else f"{spec.bits}-bit codes stored in 4 bits"
        return module, LayerKernel(name, f"{module.kernel} g{group}", spec.describe(), act_note,
                                   _dtype_name(compute_dtype), note)
    if per_row:
        module = build_int8(q, rec, compute_dtype, bias)
        note = "" if spec.bits == 8 else f"{spec.bits}-bit codes stored in 8 bits"
        return module, LayerKernel(name, module.kernel, spec.describe(), act_note, _dtype_name(compute_dtype), note)
    module = DequantLinear(q, rec.scale, rec.zero, spec, dtype, bias)
    reason = (f"group size {spec.group_size} is not a multiple of 32 dividing {linear.in_features}"
              if spec.bits <= 4 else f"{spec.bits}-bit weights in groups: the int8 kernel takes one scale per row")
    return module, LayerKernel(name, module.kernel, spec.describe(), act_note, _dtype_name(dtype), reason)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def to_real(model: nn.Module, state: QuantState, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear of `model` (in place) by its packed module; returns the model.

    `compute_dtype` is the input dtype of the weight-only kernels: None keeps the model's dtype (float32: equal
    to the simulated model to float rounding, but PyTorch 2.13's CPU kernels are slow there), torch.bfloat16
    takes their fast path at the cost of bfloat16 rounding of the layer inputs and scales.

    The state's hooks are moved: activation quantizers absorbed by an int8 x int8 kernel are dropped, every
    other transform and quantizer is attached to the new module under the same name. `model.lowbit_kernels`
    lists the kernel of every quantized linear.
    """
    state.uninstall()
    plans, absorbed = [], set()
    for name, rec in state.weights.items():
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Embedding):  # a table lookup, not a matmul: stays dequantized
            continue
        if not isinstance(linear, nn.Linear):
            raise LowbitError(f"{name} is a {type(linear).__name__}, not a linear layer: to_real needs a simulated "
                              f"model (load the run with lowbit.runfolder.load_run)")
        act = state.input_quantizers.get(name)
        module, plan = real_linear(name, linear, rec, act, compute_dtype)
        if module is not linear:
            model.set_submodule(name, module)
        if isinstance(module, W8A8Linear):
            absorbed.add(name)
        plans.append(plan)
    real_state = QuantState(weights=state.weights,
                            input_quantizers={n: q for n, q in state.input_quantizers.items() if n not in absorbed},
                            output_quantizers=state.output_quantizers, transforms=state.transforms)
    real_state.install(model)
    model.lowbit_kernels = plans
    model.lowbit_state = real_state
    return model


def memory_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied embeddings, shared tensors)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kernel_table(plans: list[LayerKernel]) -> str:
    """Markdown summary: one row per distinct (kernel, weight format, activations, note), with a layer count."""
    counts: dict[tuple, int] = {}
    for p in plans:
        key = (p.kernel, p.weight, p.activations, p.compute, p.note)
        counts[key] = counts.get(key, 0) + 1
    lines = ["| kernel | weights | activations | compute | layers | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {w} | {a} | {c} | {n} | {note} |" for (k, w, a, c, note), n in counts.items()]
    return "\n".join(lines)

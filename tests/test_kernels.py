"""Real packed kernels against the simulated (fake-quantized) layers and model they replace."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, minmax_qparams
from lowbit.kernels import memory_bytes, to_real
from lowbit.kernels.convert import real_linear
from lowbit.kernels.linear import DequantLinear, Int4WeightLinear, Int8WeightLinear, W8A8Linear
from lowbit.state import QuantState, WeightRecord

torch.set_num_threads(1)
INT8_ACT = QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)


def simulated_layer(spec: QuantSpec, n: int = 96, k: int = 256, bias: bool = True, seed: int = 0):
    """A linear with a fake-quantized weight (as the pipeline leaves it) and its weight record."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    scale, zero = minmax_qparams(linear.weight.data, spec)
    linear.weight.data = fake_quant(linear.weight.data, scale, zero, spec)
    return linear, WeightRecord(spec, scale, zero)


def outputs(spec: QuantSpec, act: ActQuantizer | None = None, **kw):
    linear, rec = simulated_layer(spec, **kw)
    x = torch.randn(3, 7, linear.in_features) * 2 + 0.3
    with torch.no_grad():
        ref = linear(act(x) if act is not None else x)
        module, plan = real_linear("layer", linear, rec, act)
        simulated_act = act is not None and "simulated" in plan.activations  # to_real keeps its hook
        return ref, module(act(x) if simulated_act else x), module, plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("spec", [QuantSpec(8, symmetric=True), QuantSpec(8, symmetric=False),
                                  QuantSpec(6, symmetric=False), QuantSpec(8, granularity="tensor")])
def test_int8_weight_only_matches_simulated(spec):
    ref, out, module, _ = outputs(spec)
    assert isinstance(module, Int8WeightLinear)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=True, group_size=64), QuantSpec(4, symmetric=False, group_size=32),
                                  QuantSpec(4, symmetric=False, group_size=128), QuantSpec(4, symmetric=False),
                                  QuantSpec(3, symmetric=False, group_size=64), QuantSpec(2, symmetric=True)])
def test_int4_weight_only_matches_simulated(spec):
    ref, out, module, plan = outputs(spec, n=72)  # 72 rows: padded to 80 for the packing op
    assert isinstance(module, Int4WeightLinear)
    assert rel_err(out, ref) < 1e-5
    if spec.granularity == "channel":
        assert module.group_size == 256  # a per-channel scale repeated over kernel groups


@pytest.mark.parametrize("act_spec", [INT8_ACT, QuantSpec(7, symmetric=False, granularity="token", dynamic=True)])
def test_w8a8_matches_simulated(act_spec):
    ref, out, module, plan = outputs(QuantSpec(8, symmetric=True), ActQuantizer(act_spec))
    assert isinstance(module, W8A8Linear)
    assert "in kernel" in plan.activations
    assert rel_err(out, ref) < 1e-5


def test_w8a8_static_per_tensor_activations():
    act = ActQuantizer(QuantSpec(8, symmetric=True, granularity="tensor"))
    act.calibrating = True
    act(torch.randn(64, 256) * 2)
    act.finish_calibration()
    ref, out, module, _ = outputs(QuantSpec(8, symmetric=True), act)
    assert isinstance(module, W8A8Linear)
    assert rel_err(out, ref) < 1e-5


def test_fallbacks_match_simulated():
    ref, out, module, plan = outputs(QuantSpec(8, symmetric=True, group_size=64))
    assert isinstance(module, DequantLinear) and "one scale per row" in plan.note
    assert rel_err(out, ref) < 1e-5
    ref, out, module, plan = outputs(QuantSpec(4, symmetric=False, group_size=48), k=240)
    assert isinstance(module, DequantLinear) and "group size 48" in plan.note
    assert rel_err(out, ref) < 1e-5
    # grouped weights with int8 activations: activations stay simulated, weights on the int4 kernel
    ref, out, module, plan = outputs(QuantSpec(4, group_size=64), ActQuantizer(INT8_ACT))
    assert isinstance(module, Int4WeightLinear) and "simulated" in plan.activations
    assert rel_err(out, ref) < 1e-5


def test_off_grid_weight_is_refused():
    linear, rec = simulated_layer(QuantSpec(4, group_size=64))
    linear.weight.data += 0.3 * rec.scale.repeat_interleave(64, 1)
    with pytest.raises(LowbitError, match="off its quantization grid"):
        real_linear("layer", linear, rec, None)


@pytest.mark.parametrize("spec,packed_bytes", [
    (QuantSpec(8, symmetric=True), lambda n, k: n * k + 4 * n),
    (QuantSpec(4, symmetric=False, group_size=64), lambda n, k: n * k // 2 + (k // 64) * n * 2 * 4),
])
def test_packed_layer_size(spec, packed_bytes):
    linear, rec = simulated_layer(spec, n=96, k=256, bias=False)
    module, _ = real_linear("layer", linear, rec, None)
    assert memory_bytes(linear) == 96 * 256 * 4
    assert memory_bytes(module) == packed_bytes(96, 256)

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import (QuantSpec, bits_per_weight, check_shape, dequantize, fake_quant, minmax_qparams,
                            params_shape, quantize, quantize_dynamic)


def test_int4_asymmetric_hand_computed():
    x = torch.tensor([[0.0, 1.5, 3.0, -1.5]])
    spec = QuantSpec(bits=4, symmetric=False)
    scale, zero = minmax_qparams(x, spec)
    assert scale.item() == pytest.approx(0.3)
    assert zero.item() == 5
    q = quantize(x, scale, zero, spec)
    assert q.tolist() == [[5.0, 10.0, 15.0, 0.0]]
    torch.testing.assert_close(dequantize(q, scale, zero, spec), x)


def test_int8_symmetric_hand_computed():
    x = torch.tensor([[-2.54, 1.0, 0.02, 2.54]])
    spec = QuantSpec(bits=8, symmetric=True)
    scale, zero = minmax_qparams(x, spec)
    assert scale.item() == pytest.approx(0.02)
    assert zero.item() == 0
    assert quantize(x, scale, zero, spec).tolist() == [[-127.0, 50.0, 1.0, 127.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 16)])
def test_error_bound_half_step(bits, symmetric, granularity, group):
    torch.manual_seed(bits)
    w = torch.randn(8, 64)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group)
    scale, zero = minmax_qparams(w, spec)
    assert scale.shape == params_shape(w, spec)
    err = (fake_quant(w, scale, zero, spec) - w).abs()
    step = scale.repeat_interleave(group, -1) if granularity == "group" else scale.expand_as(w)
    assert (err <= step / 2 + 1e-6).all()
    codes = quantize(w, scale, zero, spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert torch.equal(codes, codes.round())


def test_group_params_are_per_group():
    w = torch.ones(2, 8)
    w[0, 4:] = 10.0
    spec = QuantSpec(bits=4, granularity="group", group_size=4)
    scale, _ = minmax_qparams(w, spec)
    assert scale.shape == (2, 2)
    assert scale[0, 1] == pytest.approx(10 / 7) and scale[0, 0] == pytest.approx(1 / 7)


@pytest.mark.parametrize("variant,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_cast(variant, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 3
    spec = QuantSpec(bits=8, format="fp", fp_variant=variant, granularity="tensor")
    one, zero = torch.ones(1), torch.zeros(1)
    torch.testing.assert_close(fake_quant(x, one, zero, spec), x.to(dtype).float(), rtol=0, atol=0)


def test_fp4_e2m1_grid():
    spec = QuantSpec(bits=4, format="fp", granularity="tensor")
    x = torch.linspace(-7, 7, 1001)
    y = fake_quant(x, torch.ones(1), torch.zeros(1), spec)
    grid = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert set(y.abs().unique().tolist()) == grid
    assert fake_quant(torch.tensor([2.4, 2.6, 5.1]), torch.ones(1), torch.zeros(1), spec).tolist() == [2.0, 3.0, 6.0]


def test_fp_scale_maps_max_to_format_max():
    spec = QuantSpec(bits=8, format="fp")
    w = torch.randn(4, 32)
    scale, zero = minmax_qparams(w, spec)
    torch.testing.assert_close(scale.squeeze(1), w.abs().amax(1) / 448)
    assert (zero == 0).all()


def test_straight_through_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    spec = QuantSpec(bits=4)
    scale, zero = minmax_qparams(x, spec)
    fake_quant(x, scale, zero, spec).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_scale_receives_gradient():
    x = torch.randn(4, 16)
    spec = QuantSpec(bits=4)
    scale, zero = minmax_qparams(x, spec)
    scale.requires_grad_(True)
    fake_quant(x, scale, zero, spec).pow(2).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all() and scale.grad.abs().sum() > 0


def test_dynamic_per_token():
    x = torch.randn(2, 5, 32)
    x[0, 0] *= 100
    spec = QuantSpec(bits=8, granularity="token", dynamic=True)
    y = quantize_dynamic(x, spec)
    per_token_err = (y - x).abs().amax(-1)
    assert per_token_err[0, 0] > 10 * per_token_err[1, 1]
    assert (per_token_err <= x.abs().amax(-1) / 127 / 2 + 1e-6).all()


def test_clipped_dynamic_activations_saturate_and_round_trip(tmp_path):
    from lowbit.actquant import ActQuantizer
    from lowbit.runfolder import load_state, save_state
    from lowbit.state import QuantState

    x = torch.randn(4, 9, 64)
    spec = QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True)
    q = ActQuantizer(spec, clip_ratio=0.9)
    y = q(x)
    half_step = 0.9 * (x.amax(-1) - x.amin(-1)) / 15 / 2  # the rounded zero point may shift the grid this much
    assert (y.amax(-1) <= 0.9 * x.amax(-1) + half_step + 1e-6).all()
    assert (y.amin(-1) >= 0.9 * x.amin(-1) - half_step - 1e-6).all()
    assert (y.amax(-1) < x.amax(-1)).all()
    # a smaller step: tokens without outliers are represented more finely than by min-max
    inner = (x.abs() < 0.5 * x.abs().amax(-1, keepdim=True))
    assert ((y - x)[inner].abs().mean() < (ActQuantizer(spec)(x) - x)[inner].abs().mean())
    save_state(QuantState(input_quantizers={"layer": q}), tmp_path)
    loaded = load_state(tmp_path).input_quantizers["layer"]
    assert loaded.clip_ratio == 0.9 and torch.equal(loaded(x), y)


def test_impossible_formats_are_clear_errors():
    with pytest.raises(LowbitError, match="no 3-bit FP format"):
        QuantSpec(bits=3, format="fp")
    with pytest.raises(LowbitError, match="2 to 8 bits"):
        QuantSpec(bits=9)
    with pytest.raises(LowbitError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(LowbitError, match="does not divide the width 576"):
        check_shape((1536, 576), QuantSpec(group_size=128), "mlp.up_proj")
    with pytest.raises(LowbitError, match="not a 8-bit format"):
        QuantSpec(bits=8, format="fp", fp_variant="e2m1")


def test_bits_per_weight_accounts_for_scales_and_zeros():
    assert bits_per_weight(QuantSpec(bits=4, symmetric=False, group_size=64), 576) == pytest.approx(4 + 20 / 64)
    assert bits_per_weight(QuantSpec(bits=8), 576) == pytest.approx(8 + 16 / 576)

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import (QuantSpec, block_scale, check_shape, dequantize, expand_params, fake_quant, global_scale,
                            minmax_qparams, params_shape, quantize, quantize_dynamic, recover_codes, storage_bits)
from lowbit.observers import observe


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


def test_storage_bits_accounts_for_scales_and_zeros():
    assert storage_bits(QuantSpec(bits=4, symmetric=False, group_size=64), (3, 576)) == 3 * 576 * (4 + 20 / 64)
    assert storage_bits(QuantSpec(bits=8), (3, 576)) == 3 * 576 * 8 + 3 * 16
    assert storage_bits(QuantSpec.named("mxfp4"), (2, 64)) == 2 * 64 * 4 + 4 * 8
    assert storage_bits(QuantSpec.named("nvfp4"), (2, 64)) == 2 * 64 * 4 + 8 * 8 + 32
    # 200 x 300 in 128 x 128 blocks: 2 x 3 blocks (partial edges), 16-bit scales
    assert storage_bits(QuantSpec(bits=8, format="fp", block=(128, 128)), (200, 300)) == 200 * 300 * 8 + 6 * 16


def _mx_block(values: list[float], size: int = 32) -> torch.Tensor:
    """One block of `size` elements: the given values, then zeros."""
    return torch.tensor([values + [0.0] * (size - len(values))])


def test_mxfp4_e8m0_scale_rule_and_e2m1_rounding_hand_computed():
    spec = QuantSpec.named("mxfp4")
    # OCP MX: scale = 2^(floor(log2(amax)) - 2); amax 7.9 -> 2^0: 7.9 saturates to 6, ties go to the even mantissa
    x = _mx_block([7.9, 5.0, 2.5, 0.75, 0.25, -3.2])
    scale, zero = minmax_qparams(x, spec)
    assert scale.item() == 1.0 and zero.item() == 0
    assert quantize(x, scale, zero, spec)[0, :6].tolist() == [6.0, 4.0, 2.0, 1.0, 0.0, -3.0]
    # amax 8 -> 2^1; amax 0.3 -> floor(log2 0.3) = -2 -> 2^-4 (0.3 / 0.0625 = 4.8 -> 4 -> 0.25)
    assert minmax_qparams(_mx_block([8.0]), spec)[0].item() == 2.0
    small = _mx_block([0.3])
    s, z = minmax_qparams(small, spec)
    assert s.item() == 2.0 ** -4 and fake_quant(small, s, z, spec)[0, 0].item() == 0.25


def test_mxfp8_e8m0_scale_rule_hand_computed():
    spec = QuantSpec.named("mxfp8")
    # emax of e4m3 is 8 (448 = 1.75 * 2^8): amax 500 -> 2^0 and 500 saturates to 448; amax 1 -> 2^-8
    x = _mx_block([500.0, 1.0])
    s, z = minmax_qparams(x, spec)
    assert s.item() == 1.0 and quantize(x, s, z, spec)[0, :2].tolist() == [448.0, 1.0]
    assert minmax_qparams(_mx_block([1.0]), spec)[0].item() == 2.0 ** -8
    # an all-zero block gets the smallest E8M0 scale instead of dividing by zero
    assert minmax_qparams(torch.zeros(1, 32), spec)[0].item() == 2.0 ** -127


def test_nvfp4_two_level_scales_hand_computed():
    spec = QuantSpec.named("nvfp4")
    # tensor amax 12 -> gs = 448 * 6 / 12 = 224; block scale = e4m3(block amax / 6 * gs) / gs
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 16], x[0, 32] = 12.0, 3.0, 1.3
    gs = global_scale(x.abs().max(), spec)
    assert gs.item() == 224.0
    scale, _ = observe(x, spec)
    stored = (scale * gs)[0].tolist()
    # 2 * 224 = 448; 0.5 * 224 = 112; 1.3 / 6 * 224 = 48.53 -> 48 (e4m3 spacing 4 in [32, 64)); zero block -> 2^-9
    assert stored == pytest.approx([448.0, 112.0, 48.0, 2.0 ** -9], rel=1e-6)
    # FP8 scales round to nearest, ties to the even mantissa: 50 lies between 48 and 52 -> 48
    assert block_scale(torch.tensor([50 / 224 * 6]), spec, gs).mul(gs).item() == pytest.approx(48.0)
    # a shared (fused-tensor) gs is used as given: 12 / 6 * 100 = 200, halfway between 192 and 208 -> 192
    assert (observe(x, spec, gs=torch.tensor([100.0]))[0][0, 0] * 100).item() == pytest.approx(192.0)


def test_fp8_2d_blocks_partial_edges_hand_computed():
    spec = QuantSpec(bits=8, format="fp", block=(2, 2))
    x = torch.tensor([[1.0, -4.0, 0.5], [2.0, 3.0, -8.0], [448.0, 0.0, 0.0]])
    scale, zero = minmax_qparams(x, spec)
    assert scale.shape == params_shape(x, spec) == (2, 2)
    torch.testing.assert_close(scale * 448, torch.tensor([[4.0, 8.0], [448.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(expand_params(scale, spec, x.shape)[2, :2], torch.ones(2))
    # 3 / (4 / 448) = 336 lies halfway between e4m3's 320 and 352: ties to the even mantissa -> 320; the rest is exact
    expected = x.clone()
    expected[1, 1] = 320 * 4 / 448
    torch.testing.assert_close(fake_quant(x, scale, zero, spec), expected)


def test_spec_text_and_dict_have_one_home():
    specs = [QuantSpec.named("nvfp4"), QuantSpec(bits=8, format="fp", block=(128, 128)),
             QuantSpec(bits=4, symmetric=False, group_size=64), QuantSpec.named("mxfp8", dynamic=True)]
    assert [s.describe() for s in specs] == ["nvfp4", "fp8-e4m3 block 128x128", "int4 g64 asym", "mxfp8 dynamic"]
    for s in specs:
        assert QuantSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # a group size implies group granularity (here, and nowhere else); a block shape implies block granularity
    assert QuantSpec(group_size=64).granularity == "group" and specs[1].granularity == "block"
    with pytest.raises(LowbitError, match="either group_size"):
        QuantSpec(format="fp", bits=8, group_size=32, block=(128, 128))


def test_recover_codes_checks_the_grid_with_one_tolerance():
    torch.manual_seed(0)
    for spec in (QuantSpec.named("mxfp4"), QuantSpec(bits=8, format="fp", block=(32, 32)), QuantSpec(4, group_size=32)):
        w = torch.randn(48, 64)
        scale, zero = minmax_qparams(w, spec)
        q = quantize(w, scale, zero, spec)
        assert torch.equal(recover_codes(dequantize(q, scale, zero, spec), scale, zero, spec), q)
        off = dequantize(q, scale, zero, spec)
        step = expand_params(scale, spec, w.shape)[3, 5]
        if spec.format == "fp":  # the grid step in the code's binade
            step = step * 2.0 ** (max(q[3, 5].abs().log2().floor().item(), spec.fp.min_normal_exp) - spec.fp.mbits)
        off[3, 5] += 0.2 * step
        with pytest.raises(LowbitError, match="off its quantization grid"):
            recover_codes(off, scale, zero, spec, "w")

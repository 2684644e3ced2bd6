import torch

from lowbit.formats import QuantSpec, fake_quant, minmax_qparams
from lowbit.observers import observe


def _err(w, spec, scale, zero):
    return (fake_quant(w, scale, zero, spec) - w).pow(2).sum(-1)


def test_mse_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[:, 0] *= 20
    spec = QuantSpec(bits=3, symmetric=False)
    mm = _err(w, spec, *minmax_qparams(w, spec))
    mse = _err(w, spec, *observe(w, spec, "mse", norm=2.0))
    assert (mse <= mm + 1e-6).all()
    assert mse.sum() < 0.9 * mm.sum()


def test_mse_group_shapes():
    w = torch.randn(8, 64)
    spec = QuantSpec(bits=4, group_size=16)
    scale, zero = observe(w, spec, "mse")
    assert scale.shape == (8, 4) and zero.shape == (8, 4)


def test_percentile_100_equals_minmax_and_clips_outliers():
    torch.manual_seed(1)
    x = torch.randn(4, 1000)
    spec = QuantSpec(bits=8, symmetric=False)
    s100, z100 = observe(x, spec, "percentile", percentile=100)
    smm, zmm = minmax_qparams(x, spec)
    torch.testing.assert_close(s100, smm)
    torch.testing.assert_close(z100, zmm)
    x[:, 0] = 1000
    s99, _ = observe(x, spec, "percentile", percentile=99)
    assert (s99 < smm * 2).all()

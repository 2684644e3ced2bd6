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


def test_mse_search_keeps_the_lowest_error_shrink_of_every_group():
    """The search (in place for integer grids) returns, per group, the range of the first shrink factor with the
    lowest Lp error: recomputed here with plain fake_quant over the same 81 factors."""
    from lowbit.formats import group_view, qparams_from_range

    torch.manual_seed(2)
    w = torch.randn(24, 256) * 0.02
    w[:, :3] *= 10
    for spec in (QuantSpec(bits=4, symmetric=True, group_size=64), QuantSpec(bits=3, symmetric=False, group_size=32),
                 QuantSpec(bits=8, symmetric=True, granularity="channel")):
        g = group_view(w, spec)
        row = spec.row_spec()
        errs, ranges = [], []
        for i in range(81):
            lo, hi = g.amin(-1) * (1 - i / 100), g.amax(-1) * (1 - i / 100)
            s, z = qparams_from_range(lo, hi, row)
            errs.append((fake_quant(g, s[:, None], z[:, None], row) - g).abs().pow(2.4).sum(-1))
            ranges.append(qparams_from_range(lo, hi, spec))
        pick = torch.stack(errs).argmin(0)  # first minimum, as the search keeps the earlier factor on ties
        scale, zero = observe(w, spec, "mse")
        want_s = torch.stack([r[0] for r in ranges])[pick, torch.arange(len(pick))]
        want_z = torch.stack([r[1] for r in ranges])[pick, torch.arange(len(pick))]
        assert torch.equal(scale.flatten(), want_s), spec.describe()
        assert torch.equal(zero.flatten(), want_z), spec.describe()
        assert len(set(pick.tolist())) > 1  # the groups chose different factors: the check has teeth

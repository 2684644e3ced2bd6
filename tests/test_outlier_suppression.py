import pytest
import torch
from smoothing_utils import logits, rel_err, tiny_llama, tiny_opt, transformed_rel_err, windows

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.recipe import parse_recipe
from lowbit.steps.outlier_suppression import OSArgs, OutlierSuppression

STATIC8 = QuantSpec(bits=8, granularity="tensor")


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_gamma_migration_preserves_logits_and_moves_gamma(make):
    model = make()
    err = transformed_rel_err(model, OutlierSuppression(), windows(4, 64, 0), windows(2, 64, 1))
    assert err < 1e-4
    adapter = get_adapter(model)
    for group in adapter.norm_groups:
        norm = adapter.blocks(model)[0].get_submodule(group.norm)
        torch.testing.assert_close(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_token_clipping_sets_static_ranges_and_beats_minmax(make):
    calib, ids = windows(4, 64, 0), windows(2, 64, 1)
    ref = make()
    fp = logits(ref, ids)
    errs = {}
    for clip in (False, True):
        model = make()
        step = OutlierSuppression(OSArgs(token_clipping=clip, search_samples=2))
        state = compress(model, get_adapter(model), FormatPlan(activations=STATIC8), [step], calib, progress=False)
        state.install(model)
        assert all(q.scale is not None for q in state.input_quantizers.values())
        errs[clip] = rel_err(logits(model, ids), fp)
        if clip:
            for q in state.input_quantizers.values():
                q.enabled = False
            assert rel_err(logits(model, ids), fp) < 1e-4  # clipping only touches the quantizers
    assert errs[True] < errs[False]


def test_token_clipping_refuses_dynamic_activations():
    model = tiny_llama()
    dyn = FormatPlan(activations=QuantSpec(bits=8, granularity="token", dynamic=True))
    with pytest.raises(LowbitError, match="dynamic per-token"):
        compress(model, get_adapter(model), dyn, [OutlierSuppression(OSArgs(token_clipping=True))],
                 windows(2, 64, 0), progress=False)
    with pytest.raises(LowbitError, match=r"steps\[0\]\.os\.quantiles\.0: Input should be less than or equal to 1"):
        parse_recipe({"steps": [{"os": {"quantiles": [1.5]}}]})

import pytest
import torch
from smoothing_utils import logits, rel_err, tiny_llama, tiny_opt, transformed_rel_err, windows

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps.osplus import OSPlusArgs, OutlierSuppressionPlus

A4 = QuantSpec(bits=4, granularity="token", dynamic=True)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_osplus_alone_preserves_logits(make):
    model = make()
    err = transformed_rel_err(model, OutlierSuppressionPlus(OSPlusArgs(grid=4, search_samples=2)),
                              windows(4, 64, 0), windows(2, 64, 1))
    assert err < 1e-4


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_osplus_searched_transform_is_exact_and_helps(make):
    """With quantized activations the search picks real scales (and shifts on OPT); the FP function is intact."""
    calib, ids = windows(4, 64, 0), windows(2, 64, 1)
    ref = make()
    fp = logits(ref, ids)
    rtn = make()
    compress(rtn, get_adapter(rtn), FormatPlan(activations=A4), [], calib, progress=False).install(rtn)
    model = make()
    state = compress(model, get_adapter(model), FormatPlan(activations=A4),
                     [OutlierSuppressionPlus(OSPlusArgs(grid=8, search_samples=2))], calib, progress=False)
    state.install(model)
    assert rel_err(logits(model, ids), fp) < rel_err(logits(rtn, ids), fp)
    adapter = get_adapter(model)
    group = adapter.norm_groups[0]
    norm, norm_ref = (adapter.blocks(m)[0].get_submodule(group.norm) for m in (model, ref))
    assert not torch.allclose(norm.weight, norm_ref.weight)
    if getattr(norm, "bias", None) is not None:
        assert not torch.allclose(norm.bias, norm_ref.bias / (norm_ref.weight / norm.weight))  # shifted too
    for q in state.input_quantizers.values():
        q.enabled = False
    assert rel_err(logits(model, ids), fp) < 1e-4


def test_shift_on_rmsnorm_is_refused():
    model = tiny_llama()
    with pytest.raises(LowbitError, match="shift: false"):
        compress(model, get_adapter(model), FormatPlan(), [OutlierSuppressionPlus(OSPlusArgs(shift=True))],
                 windows(2, 64, 0), progress=False)

import pytest
import torch
from smoothing_utils import tiny_llama, tiny_opt, transformed_rel_err, windows

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import Settings, compress
from lowbit.recipe import parse_recipe
from lowbit.steps.smoothquant import SmoothQuant, SmoothQuantArgs


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("pairs", [False, True])
def test_smoothquant_preserves_logits(make, pairs):
    model = make()
    err = transformed_rel_err(model, SmoothQuant(SmoothQuantArgs(alpha=0.6, pairs=pairs)), windows(4, 64, 0),
                              windows(2, 64, 1))
    assert err < 1e-4


def test_smoothquant_changes_weights_and_flattens_norm_output():
    model = tiny_llama()
    adapter = get_adapter(model)
    norm = adapter.blocks(model)[0].input_layernorm
    before = norm.weight.detach().clone()
    compress(model, adapter, Settings(), [SmoothQuant(SmoothQuantArgs(alpha=1.0))], windows(4, 64, 0),
             progress=False)
    assert not torch.allclose(norm.weight, before)
    assert norm.weight.abs().max() / norm.weight.abs().min() < before.abs().max() / before.abs().min()


def test_alpha_search_picks_from_grid_and_preserves_fp():
    model = tiny_llama()
    acts = QuantSpec(bits=8, granularity="token", dynamic=True)
    step = SmoothQuant(SmoothQuantArgs(alpha_grid=[0.3, 0.5, 0.8], search_samples=2))
    # weights stay FP and activation quantizers are disabled afterwards: the FP function must be intact
    state = compress(model, get_adapter(model), Settings(activations=acts), [step], windows(4, 64, 0),
                     progress=False)
    for q in state.inputs.values():
        q.enabled = False
    ref = tiny_llama()
    ids = windows(2, 64, 1)
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LowbitError, match="alpha"):
        parse_recipe({"steps": [{"smoothquant": {"alpha": 1.5}}]})
    with pytest.raises(LowbitError, match="activations"):
        SmoothQuant(SmoothQuantArgs(alpha_grid=[0.5])).before_blocks(
            type("Ctx", (), {"settings": Settings()})())

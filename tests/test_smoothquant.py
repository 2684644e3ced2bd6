import ast

import pytest
import torch
from smoothing_utils import tiny_llama, tiny_opt, transformed_rel_err, windows

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
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
    compress(model, adapter, FormatPlan(), [SmoothQuant(SmoothQuantArgs(alpha=1.0))], windows(4, 64, 0),
             progress=False)
    assert not torch.allclose(norm.weight, before)
    assert norm.weight.abs().max() / norm.weight.abs().min() < before.abs().max() / before.abs().min()


def test_alpha_search_picks_from_grid_and_preserves_fp(caplog):
    acts = QuantSpec(bits=8, granularity="token", dynamic=True)
    grid = [0.3, 0.5, 0.8]
    params = {}
    for name, args in (("grid", {"alpha_grid": grid}), ("one", {"alpha_grid": [0.8]}), ("fixed", {"alpha": 0.8})):
        model = tiny_llama()
        caplog.clear()
        with caplog.at_level("INFO", logger="lowbit"):
            state = compress(model, get_adapter(model), FormatPlan(activations=acts),
                             [SmoothQuant(SmoothQuantArgs(search_samples=2, **args))], windows(4, 64, 0),
                             progress=False)
        params[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if name == "grid":
            chosen = [ast.literal_eval(r.getMessage().split("alpha ", 1)[1]) for r in caplog.records
                      if r.getMessage().startswith("smoothquant")]
            assert len(chosen) == 2 and all(a in grid for c in chosen for a in c.values())
            # weights stay FP and activation quantizers are disabled afterwards: the FP function must be intact
            for q in state.input_quantizers.values():
                q.enabled = False
            ids = windows(2, 64, 1)
            with torch.no_grad():
                a, b = model(ids).logits, tiny_llama()(ids).logits
            assert ((a - b).norm() / b.norm()).item() < 1e-4
    for n, p in params["one"].items():  # the searched alpha is the one applied
        assert torch.equal(p, params["fixed"][n]), n


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LowbitError, match="alpha"):
        parse_recipe({"steps": [{"smoothquant": {"alpha": 1.5}}]})
    for grid in ([], [0.5, 1.2]):
        with pytest.raises(LowbitError, match=r"steps\[0\]\.smoothquant\.alpha_grid"):
            parse_recipe({"steps": [{"smoothquant": {"alpha_grid": grid}}]})
    with pytest.raises(LowbitError, match="activations"):
        SmoothQuant(SmoothQuantArgs(alpha_grid=[0.5])).before_blocks(
            type("Ctx", (), {"plan": FormatPlan()})())

import pytest
import torch

from lowbit.formats import QuantSpec, dequantize, quantize
from lowbit.models import get_adapter
from lowbit.observers import observe
from lowbit.pipeline import FormatPlan, compress, rounding_plan
from lowbit.steps.awq import AWQ, search_clip
from lowbit.steps.gptq import GPTQ
from lowbit.steps.lwc import LWC
from solver_utils import block_contexts, tiny_llama, tiny_opt

SPEC = QuantSpec(3, symmetric=False, group_size=32)


def _fold_only(model, ids, spec, **args):
    """Search and fold AWQ scales into every block without clipping or quantizing."""
    step = AWQ(AWQ.Args(clip=False, quantize=False, **args))
    for ctx in block_contexts(model, spec, ids):
        step.on_block(ctx)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_folded_scales_keep_fp_logits(make):
    model = make()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    before = {n: p.clone() for n, p in model.named_parameters()}
    _fold_only(model, ids, SPEC)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    adapter = get_adapter(model)
    assert any(adapter.norm_groups[0].norm in n for n in changed)  # a norm absorbed scales
    assert any(adapter.linear_pairs[0].prev in n for n in changed)  # v_proj rows absorbed o_proj's scales
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.slow
def test_folded_scales_keep_fp_logits_embedded(embedded):
    model, ids = embedded
    ref = model(ids).logits
    saved = {n: p.clone() for n, p in model.named_parameters()}
    try:
        _fold_only(model, ids[:2], QuantSpec(4, symmetric=False, group_size=64), n_grid=4)
        out = model(ids).logits
        assert ((out - ref).norm() / ref.norm()) < 1e-4
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_clip_search_lowers_output_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    w[0, 3] = 8.0  # an outlier worth clipping
    x = torch.randn(256, 64, generator=gen)
    spec = QuantSpec(3, symmetric=False, group_size=32)

    def out_err(v):
        s, z = observe(v, spec)
        return ((x @ (dequantize(quantize(v, s, z, spec), s, z, spec) - w).T) ** 2).sum()

    clipped = search_clip(w, x, spec, grid=20, max_shrink=0.5)
    assert out_err(clipped) < out_err(w)
    assert (clipped.abs() <= w.abs()).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_awq_quantizes_alone_and_defers_to_a_later_solver(make):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    errors, params = {}, {}
    runs = (("rtn", []), ("awq", [AWQ()]), ("awq+gptq", [AWQ(), GPTQ()]), ("awq+lwc", [AWQ(), LWC()]),
            ("awq rounding", [AWQ(AWQ.Args(quantize=True))]), ("awq folding, gptq", [AWQ(AWQ.Args(quantize=False)), GPTQ()]))
    for name, steps in runs:
        model = make()
        ref = model(ids).logits
        state = compress(model, get_adapter(model), FormatPlan(weights=SPEC), steps, ids, progress=False)
        errors[name] = ((model(ids).logits - ref).norm() / ref.norm()).item()
        params[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        for rec_name, rec in state.weights.items():
            w = model.get_submodule(rec_name).weight.data
            assert torch.equal(dequantize(quantize(w, rec.scale, rec.zero, SPEC), rec.scale, rec.zero, SPEC), w)
    assert errors["awq"] < errors["rtn"] and errors["awq+gptq"] < errors["rtn"]
    for same, as_ in (("awq", "awq rounding"), ("awq+gptq", "awq folding, gptq")):  # who rounded, exactly
        for n, p in params[same].items():
            assert torch.equal(p, params[as_][n]), (same, n)


def test_rounding_plan_gives_each_weight_one_solver():
    alone, first, forced, folding = AWQ(), AWQ(), AWQ(AWQ.Args(quantize=True)), AWQ(AWQ.Args(quantize=False))
    assert rounding_plan([alone]) == (True,)
    assert rounding_plan([first, GPTQ()]) == (False, True) and rounding_plan([first, LWC()]) == (False, True)
    assert rounding_plan([forced, GPTQ()]) == (True, True)  # GPTQ then finds nothing pending
    assert rounding_plan([GPTQ(), first]) == (True, True)  # only later steps count
    assert rounding_plan([folding]) == (False,)

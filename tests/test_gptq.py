import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import gemm
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, dequantize, fake_quant, quantize
from lowbit.models import get_adapter
from lowbit.observers import observe
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps.gptq import (GPTQ, UpperGram, _all_finite, accumulate_hessians, gptq_quantize, group_order,
                               inverse_cholesky_upper)
from solver_utils import block_contexts, tiny_llama, tiny_opt

SPECS = [QuantSpec(4, symmetric=False, group_size=32), QuantSpec(3), QuantSpec(4, granularity="tensor"),
         QuantSpec(4, format="fp"), QuantSpec(8, format="fp", group_size=32), QuantSpec.named("mxfp4"),
         QuantSpec.named("nvfp4"), QuantSpec.named("mxfp8"), QuantSpec(8, format="fp", block=(32, 32))]


def _data(cols=128, rows=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(1024, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3
    return w, x, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("cols", [5, 128, 300])
def test_upper_gram_strips_sum_to_the_full_gram(cols):
    gen = torch.Generator().manual_seed(cols)
    gram = UpperGram(cols, strip=16)
    full = torch.zeros(cols, cols, dtype=torch.float64)
    upper = torch.zeros_like(full)  # the same strip products, summed into a full matrix
    width = max(16, -(-cols // 8))  # strips of 16 columns, at most 8 strips
    for _ in range(3):  # accumulated over batches, as over calibration batches
        x = torch.randn(200, cols, generator=gen)
        gram.add(x)
        full += x.double().T @ x.double()
        xt = x.T.contiguous() if gemm.applies(x) else x.T  # the products as UpperGram computes them
        for a in range(0, cols, width):
            upper[a:a + width, a:] += gemm.linear(xt[a:a + width], xt[a:]).double()
    assert gram.count == 600 and len(gram.strips) == -(-cols // width)
    stored = sum(s.numel() for s in gram.strips)
    assert stored < 0.6 * cols * cols or cols < 16 * 8  # about half a matrix once there are 8 strips
    upper = upper.triu()
    want = (2 * (upper + upper.triu(1).T) / 600).float()  # mirrored and scaled in float64, then rounded
    h = gram.matrix(2, 600)
    assert not gram.strips  # freed as read
    assert torch.equal(h, want)
    torch.testing.assert_close(h, (2 * full / 600).float(), rtol=1e-5, atol=1e-4)


def test_inverse_cholesky_factor_without_forming_the_inverse():
    _, _, h = _data(cols=96)
    h = h + 0.01 * h.diagonal().mean() * torch.eye(96)
    u, info = inverse_cholesky_upper(h)
    assert info == 0 and torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    torch.testing.assert_close(u.T @ u @ h, torch.eye(96), rtol=0, atol=2e-4)  # UᵀU = H⁻¹
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True)
    torch.testing.assert_close(u.double(), ref, rtol=1e-4, atol=1e-5)  # the factor the usual chain computes
    assert inverse_cholesky_upper(-torch.eye(4))[1] != 0  # not positive definite: reported, not raised
    order = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    damped = h.diagonal()[order] * 1.5
    hp = h[order][:, order]
    hp.diagonal().copy_(damped)
    u2, info = inverse_cholesky_upper(h, order, damped)  # permuted and damped without copying H first
    assert info == 0 and torch.equal(u2, inverse_cholesky_upper(hp)[0])


def test_factor_check_finds_any_non_finite_element():
    u = torch.randn(40, 40).triu().t()  # column-major, as the factor is
    assert _all_finite(u)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (39, 0), (17, 3)):
            v = u.clone()
            v[where] = bad
            assert not _all_finite(v), (bad, where)


_PEAK = """
import sys, torch
from lowbit.formats import QuantSpec
from lowbit.steps.gptq import gptq_quantize
torch.set_num_threads(1)
n = 3072
x = torch.randn(n + 256, n, generator=torch.Generator().manual_seed(0))
h = x.T @ x / n
del x
w = torch.randn(64, n)
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark to the current RSS
before = status("VmRSS")
gptq_quantize(w, h, QuantSpec(4, symmetric=False, group_size=64), "minmax", 0.05, 128, True,
              consume_h=sys.argv[1] == "consume")
print((status("VmHWM") - before) / (n * n * 4))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize("mode,bound", [("keep", 2.6), ("consume", 1.6)])
def test_solve_holds_few_hessian_sized_matrices(mode, bound):
    """GPTQ's solve needs the factor of H⁻¹ and one work matrix beside the caller's H (and one less when the step
    hands its H over, `consume_h`); a 14336-wide Hessian (an 8B down projection) is 0.8 GB in float32, so each
    extra copy counts (the straightforward chain held seven)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MALLOC_MMAP_THRESHOLD_": "1048576"}  # large blocks mapped and returned when freed: the peak is what lived
    done = subprocess.run([sys.executable, "-c", _PEAK, mode], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < bound


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_identity_hessian_equals_rtn(spec, observer):
    w, _, _ = _data()
    scale, zero = observe(w, spec, observer)
    q, s, z = gptq_quantize(w, torch.eye(w.shape[1]), spec, observer)
    assert torch.equal(q, fake_quant(w, scale, zero, spec))
    assert torch.equal(s, scale) and torch.equal(z, zero)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_gptq_beats_rtn_and_stays_on_grid(spec):
    w, x, h = _data()
    scale, zero = observe(w, spec)
    for act_order in (False, True, "group"):
        q, s, z = gptq_quantize(w, h, spec, act_order=act_order)
        assert ((x @ (q - w).T) ** 2).sum() < 0.7 * ((x @ (fake_quant(w, scale, zero, spec) - w).T) ** 2).sum()
        assert torch.equal(dequantize(quantize(q, s, z, spec), s, z, spec), q)


def test_diag_damp_moves_from_gptq_to_round_to_nearest():
    """diag_damp adds a multiple of each H_ii to it: 0 is plain GPTQ, and as it grows the off-diagonal terms that
    drive error compensation vanish, so the result approaches round-to-nearest with the same ranges."""
    w, x, h = _data()
    spec = QuantSpec(4, symmetric=False, group_size=32)
    scale, zero = observe(w, spec)
    rtn = fake_quant(w, scale, zero, spec)
    plain = gptq_quantize(w, h, spec, act_order=True)[0]
    assert torch.equal(gptq_quantize(w, h, spec, act_order=True, diag_damp=0.0)[0], plain)
    same = [(gptq_quantize(w, h, spec, act_order=True, diag_damp=d)[0] == rtn).float().mean().item()
            for d in (0.0, 1.0, 1e6)]
    assert same[0] < same[1] < same[2] and same[2] > 0.999


def test_diag_damp_generalizes_when_the_hessian_comes_from_few_samples():
    """With H estimated from few inputs of a correlated distribution, shrinking it towards its diagonal gives a
    smaller output error on fresh inputs of the same distribution (covariance shrinkage), while the error on the
    calibration inputs themselves is lowest without it."""
    gen = torch.Generator().manual_seed(1)
    cols = 256
    mix = torch.randn(cols, cols, generator=gen) * torch.rand(cols, generator=gen) ** 4  # uneven, correlated
    w = torch.randn(128, cols, generator=gen)
    calib, fresh = (torch.randn(n, cols, generator=gen) @ mix for n in (300, 8192))
    h = 2 * calib.T @ calib / calib.shape[0]
    spec = QuantSpec(4, symmetric=False, group_size=32)

    def errors(d):
        q = gptq_quantize(w, h, spec, act_order=True, damp=0.01, diag_damp=d)[0]
        return [((x @ (q - w).T) ** 2).mean().item() for x in (calib, fresh)]

    (calib0, fresh0), (calib1, fresh1) = errors(0.0), errors(0.3)
    assert calib0 < calib1 and fresh1 < 0.95 * fresh0


def test_act_order_static_groups_keep_group_scales():
    w, _, h = _data()
    spec = QuantSpec(4, symmetric=False, group_size=32)
    _, s_plain, z_plain = gptq_quantize(w, h, spec, static_groups=True)
    q, s_act, z_act = gptq_quantize(w, h, spec, act_order=True)
    assert torch.equal(s_plain, s_act) and torch.equal(z_plain, z_act)
    assert torch.equal(s_plain, observe(w, spec)[0])


def test_group_order_visits_whole_groups_by_their_largest_diagonal():
    diag = torch.tensor([1., 7, 2, 3, 8, 0, 5, 4, 9, 6, 0.5, 0.1])
    perm = group_order(diag, 4)
    assert perm.tolist() == [8, 9, 10, 11, 4, 6, 7, 5, 1, 3, 2, 0]
    w, x, h = _data()
    spec = QuantSpec(4, symmetric=False, group_size=32)
    q, s, _ = gptq_quantize(w, h, spec, act_order="group")
    # each group's range comes from its error-compensated weights, not the original ones (as with act_order=True)
    assert not torch.equal(s, observe(w, spec)[0])
    plain, _, _ = gptq_quantize(w, h, spec)
    assert ((x @ (q - w).T) ** 2).sum() < 1.05 * ((x @ (plain - w).T) ** 2).sum()


def test_dead_columns_and_singular_hessian_without_damping():
    w, _, _ = _data(cols=64)
    x = torch.randn(8, 64)  # rank 8 < 64: H is singular
    x[:, 5] = 0  # a dead input channel
    h = 2 * x.T @ x / 8
    q, s, z = gptq_quantize(w, h, QuantSpec(4, group_size=32), damp=0.0)
    assert torch.isfinite(q).all() and torch.isfinite(s).all()
    assert (q[:, 5] == 0).all()


def test_group_size_not_dividing_width_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(LowbitError, match="group size 48 does not divide"):
        compress(model, get_adapter(model), FormatPlan(weights=QuantSpec(4, group_size=48)), [GPTQ()],
                 torch.randint(0, 128, (2, 16)), progress=False)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_model_error_below_rtn(make, true_sequential):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(3, symmetric=False, group_size=32)
    errors = {}
    for name, steps in (("rtn", []), ("gptq", [GPTQ(GPTQ.Args(true_sequential=true_sequential))])):
        model = make()
        ref = model(ids).logits
        state = compress(model, get_adapter(model), FormatPlan(weights=spec), steps, ids, progress=False)
        errors[name] = ((model(ids).logits - ref).norm() / ref.norm()).item()
        assert len(state.weights) == len(get_adapter(model).linear_order) * 2
    assert errors["gptq"] < 0.9 * errors["rtn"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=False, group_size=64), QuantSpec(3, symmetric=False)],
                         ids=lambda s: s.describe())
def test_real_layer_output_error_below_rtn(embedded, spec):
    model, ids = embedded
    ctx = next(block_contexts(model, spec, ids))
    group = ("mlp.gate_proj", "mlp.up_proj")
    h = accumulate_hessians(ctx, [group])[group[0]]
    feats = []
    ctx.collect([group[0]], lambda _r, x, _o: feats.append(x.reshape(-1, x.shape[-1])), stop_early=True)
    x = torch.cat(feats)
    for rel in group:
        w = ctx.block.get_submodule(rel).weight.data
        scale, zero = observe(w, spec)
        q, _, _ = gptq_quantize(w, h, spec)
        err_gptq = ((x @ (q - w).T) ** 2).mean()
        err_rtn = ((x @ (fake_quant(w, scale, zero, spec) - w).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (rel, err_gptq, err_rtn)


def test_true_sequential_uses_quantized_inputs():
    """With true_sequential, o_proj's Hessian comes from inputs through the already-quantized q/k/v."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(3, group_size=32)
    ctx = next(block_contexts(model, spec, ids))
    before = accumulate_hessians(ctx, [("self_attn.o_proj",)])["self_attn.o_proj"]
    GPTQ()._quantize_group(ctx, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           accumulate_hessians(ctx, [("self_attn.q_proj",)])["self_attn.q_proj"])
    after = accumulate_hessians(ctx, [("self_attn.o_proj",)])["self_attn.o_proj"]
    assert not torch.allclose(before, after)
    assert ctx.is_quantized("self_attn.v_proj") and not ctx.is_quantized("self_attn.o_proj")


def test_nvfp4_fused_linears_share_one_tensor_scale_and_off_grid_scales_are_refused():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    ctx = next(block_contexts(model, QuantSpec.named("nvfp4"), ids))
    GPTQ().on_block(ctx)
    recs = {r: ctx.state.weights[ctx.full_name(r)] for r in ctx.linears()}
    qkv = [recs[f"self_attn.{p}_proj"].global_scale for p in "qkv"]
    amax = max(ctx.block.get_submodule(f"self_attn.{p}_proj").weight.abs().max() for p in "qkv")
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    assert not torch.equal(qkv[0], recs["self_attn.o_proj"].global_scale)  # o_proj reads another input
    # gs = 448 * 6 / fused amax (the largest weight lands exactly on 6 x a block scale of code 448, so it survives)
    torch.testing.assert_close(qkv[0], 448 * 6 / amax.reshape(1), rtol=1e-6, atol=0)
    mx = next(block_contexts(tiny_llama(), QuantSpec.named("mxfp4"), ids))
    w = mx.block.get_submodule("self_attn.o_proj").weight.data
    scale, zero = observe(w, QuantSpec.named("mxfp4"))
    with pytest.raises(LowbitError, match="are not e8m0 values"):
        mx.set_quantized_weight("self_attn.o_proj", w, QuantSpec.named("mxfp4"), scale * 1.1, zero)

"""AdaRound on a real layer of the embedded model, and the soft-rounding machinery on a tiny model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.context import BlockContext, FormatPlan, ModelContext
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, minmax_qparams
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import capture_block_inputs, compress
from lowbit.recipe import parse_recipe
from lowbit.reconstruction import ReconArgs, Schedule, SoftRounding, output_error, reconstruct_layers
from lowbit.state import QuantState
from lowbit.steps import build_step, get_step
from solver_utils import tiny_llama as solver_tiny_llama


def _codes(w, scale, zero, spec):
    g = w.reshape(scale.shape[0], -1) if spec.granularity == "channel" else w.reshape(-1, spec.group_size)
    s, z = scale.reshape(g.shape[0], 1), zero.reshape(g.shape[0], 1)
    return g / s, torch.round(g / s) + z, s, z


@pytest.mark.slow
def test_adaround_beats_rtn_on_a_real_layer_with_floor_or_ceil_codes():
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model)
    ids = calibration_windows(tokenize(tok, load_text("wikitext2", "validation")), 4, 64, 0)
    x, args, kwargs = capture_block_inputs(model, adapter, ids)
    rel, spec = "self_attn.k_proj", QuantSpec(3, symmetric=False)
    plan = FormatPlan(weights=None, overrides=((f"model.layers.0.{rel}", spec),))
    block = adapter.blocks(model)[0]
    linear = block.get_submodule(rel)
    w_fp = linear.weight.data.clone()

    def context():
        return BlockContext(ModelContext(model, adapter, plan, QuantState(), ids), 0, block, x, args, kwargs)

    inputs = []
    context().collect([rel], lambda _r, i, _o: inputs.append(i))
    xin = torch.cat(inputs)

    def output_mse():
        return ((xin @ linear.weight.T - xin @ w_fp.T) ** 2).mean().item()

    context().round_to_nearest(rel, "minmax")
    rtn_mse = output_mse()
    linear.weight.data.copy_(w_fp)
    ctx = context()
    reconstruct_layers(ctx, ReconArgs(iters=30, batch_size=1, seed=0))
    ada_mse = output_mse()
    assert ada_mse < 0.95 * rtn_mse

    rec = ctx.state.weights[f"model.layers.0.{rel}"]
    scaled, codes, s, z = _codes(linear.weight.data, rec.scale, rec.zero, spec)
    fp_scaled = w_fp / s
    lo = torch.clamp(torch.floor(fp_scaled) + z, spec.qmin, spec.qmax)
    hi = torch.clamp(torch.ceil(fp_scaled) + z, spec.qmin, spec.qmax)
    assert torch.allclose(scaled, torch.round(scaled), atol=1e-3)  # on the grid
    assert bool(((codes == lo) | (codes == hi)).all())
    assert bool((codes != torch.clamp(torch.round(fp_scaled) + z, spec.qmin, spec.qmax)).any())  # not just RTN


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, torch.randint(0, 128, (6, 32))


@pytest.mark.parametrize("spec", [QuantSpec(3, symmetric=False, group_size=32), QuantSpec(2, symmetric=True)])
def test_soft_rounding_starts_at_the_weight_and_hardens_to_nearest(spec):
    w = torch.randn(16, 64)
    scale, zero = minmax_qparams(w, spec)
    soft = SoftRounding(w, spec, scale, zero)
    g, _, s, z = _codes(w, scale, zero, spec)
    in_range = ((torch.clamp(g + z, spec.qmin, spec.qmax) - z) * s).reshape(w.shape)  # what any rounding clips to
    err = (soft(w) - in_range).abs().reshape(g.shape)
    assert bool((err <= 0.011 * s).all())  # h(V) = fractional part, kept within [0.01, 0.99]
    nearest = ((torch.clamp(torch.floor(g + 0.5) + z, spec.qmin, spec.qmax) - z) * s).reshape(w.shape)
    assert torch.equal(soft.hard_weight(), nearest)


def test_adaround_with_zero_steps_from_rtn_init_reproduces_rtn():
    spec = QuantSpec(3, symmetric=False, group_size=32)
    model_a, ids = _tiny()
    compress(model_a, get_adapter(model_a), FormatPlan(weights=spec), [get_step("rtn")()], ids, progress=False)
    model_b, _ = _tiny()
    step = get_step("adaround")
    compress(model_b, get_adapter(model_b), FormatPlan(weights=spec), [step(step.Args(iters=0, init="rtn"))], ids,
             progress=False)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("step,init,match", [
    ("brecq", "awq", "'awq' also changes the block beyond its weights"),
    ("adaround", {"awq": {"quantize": True}}, "'awq' also changes the block"),
    ("qdrop", "smoothquant", "'smoothquant' does not solve weights"),
    ("adaround", "nope", "unknown step 'nope'"),
    ("brecq", {"gptq": {"dampp": 0.1}}, "brecq.init.gptq.dampp: Extra inputs"),
    ("adaround", {"gptq": {}, "rtn": {}}, "give one step"),
])
def test_refused_init_fails_at_recipe_validation_in_one_line(step, init, match):
    with pytest.raises(LowbitError, match=match) as err:
        parse_recipe({"steps": [{step: {"init": init}}]})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("step,init", [(s, i) for s in ("adaround", "brecq", "qdrop")
                                       for i in ("rtn", "gptq", {"lwc": {"epochs": 1}})])
def test_accepted_init_leaves_the_block_computing_what_it_should(step, init):
    """An init solver's rounding is read and the block rolled back: every parameter but the rounded weights is the FP
    model's, each weight sits on its recorded grid, and the model is as close to FP as round-to-nearest leaves it."""
    spec = QuantSpec(4, symmetric=False, group_size=32)
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    fp = solver_tiny_llama()
    with torch.no_grad():
        target = fp(ids).logits
    errors = {}
    for name, steps in (("rtn", [get_step("rtn")()]),
                        ("init", [build_step(step, {"iters": 0, "init": init}, step)])):
        model = solver_tiny_llama()
        state = compress(model, get_adapter(model), FormatPlan(weights=spec), steps, ids, progress=False)
        for n, p in model.named_parameters():
            if n.removesuffix(".weight") not in state.weights:
                assert torch.equal(p, fp.get_parameter(n)), n
        for n, rec in state.weights.items():
            w = model.get_submodule(n).weight.data
            assert torch.allclose(fake_quant(w, rec.scale, rec.zero, spec), w, atol=1e-6), n
        with torch.no_grad():
            errors[name] = (model(ids).logits - target).pow(2).mean().item()
    assert errors["init"] < 2 * errors["rtn"]


def test_schedule_warms_up_then_anneals_beta():
    s = Schedule(iters=100, lam=0.01, beta_start=20, beta_end=2, warmup=0.2)
    assert s.at(0) == (0.0, 20) and s.at(19)[0] == 0.0
    assert s.at(20) == (0.01, 20)
    assert s.at(60)[1] == pytest.approx(11)
    assert s.at(99)[1] == pytest.approx(2 + 18 / 80)


def test_adaround_lowers_the_model_error_vs_rtn_and_records_its_grid():
    spec = QuantSpec(2, symmetric=False, group_size=32)
    ref, ids = _tiny()
    with torch.no_grad():
        target = ref(ids).logits
    errors = {}
    for name, args in (("rtn", {}), ("adaround", {"iters": 40})):
        model, _ = _tiny()
        step = get_step(name)
        state = compress(model, get_adapter(model), FormatPlan(weights=spec), [step(step.Args(**args))], ids,
                         progress=False)
        with torch.no_grad():
            errors[name] = (model(ids).logits - target).pow(2).mean().item()
    assert errors["adaround"] < errors["rtn"]
    for name, rec in state.weights.items():  # the stored weights lie on the recorded grid
        w = model.get_submodule(name).weight.data
        assert torch.allclose(fake_quant(w, rec.scale, rec.zero, spec), w, atol=1e-6), name


def test_gptq_init_starts_from_gptqs_rounding():
    spec = QuantSpec(3, symmetric=False, group_size=32)
    model_g, ids = _tiny()
    fp = {n: p.detach().clone() for n, p in model_g.named_parameters()}
    state_g = compress(model_g, get_adapter(model_g), FormatPlan(weights=spec), [get_step("gptq")()], ids,
                       progress=False)
    model_a, _ = _tiny()
    step = get_step("adaround")
    state_a = compress(model_a, get_adapter(model_a), FormatPlan(weights=spec), [step(step.Args(iters=0, init="gptq"))],
                       ids, progress=False)
    representable = total = 0
    for name in [n for n in state_g.weights if n.startswith("model.layers.0.")]:  # same inputs in both runs
        rec = state_g.weights[name]
        assert torch.equal(state_a.weights[name].scale, rec.scale)
        w_g, w_a = model_g.get_submodule(name).weight.data, model_a.get_submodule(name).weight.data
        g_scaled, _, s, _ = _codes(w_g, rec.scale, rec.zero, spec)
        a_scaled = _codes(w_a, rec.scale, rec.zero, spec)[0]
        fp_scaled = fp[name + ".weight"].reshape(g_scaled.shape) / s
        offset = torch.round(g_scaled) - torch.floor(fp_scaled)
        ok = (offset == 0) | (offset == 1)
        assert torch.equal(torch.round(a_scaled)[ok], torch.round(g_scaled)[ok])
        representable, total = representable + int(ok.sum()), total + ok.numel()
    assert representable > 0.8 * total


def test_token_relative_loss_is_not_dominated_by_an_outlier_token():
    """A sink token 1000x larger than the rest (as in SmolLM2's middle blocks) decides a plain MSE, not the default."""
    target = torch.randn(2, 16, 32)
    target[:, 0] *= 1000
    small_err_on_sink = target.clone()
    small_err_on_sink[:, 0] *= 1.01  # 1% error on the sink token only
    large_err_elsewhere = target.clone()
    large_err_elsewhere[:, 1:] *= 1.5  # 50% error on every other token
    mse = [output_error(p, target, loss="mse") for p in (small_err_on_sink, large_err_elsewhere)]
    rel = [output_error(p, target) for p in (small_err_on_sink, large_err_elsewhere)]
    assert mse[0] > mse[1]  # plain MSE prefers wrecking 15 tokens to a 1% error on the sink
    assert rel[0] < rel[1]
    assert torch.allclose(rel[1], torch.tensor(0.25 * 15 / 16))


def test_training_decides_the_rounding_and_too_few_steps_warn(caplog):
    """Hardening an undecided h moves the weight away from what the loss was minimized for: the run says so."""
    spec = QuantSpec(2, symmetric=False, group_size=32)
    fractions = {}
    for iters in (0, 200):
        model, ids = _tiny()
        step = get_step("brecq")
        caplog.clear()
        with caplog.at_level("INFO", logger="lowbit"):
            compress(model, get_adapter(model), FormatPlan(weights=spec), [step(step.Args(iters=iters, batch_size=2))],
                     ids, progress=False)
        infos = [r.getMessage() for r in caplog.records if "undecided at hardening" in r.getMessage()]
        assert len(infos) == 2  # one line per block
        fractions[iters] = [float(m.split(": ")[1].split("%")[0]) for m in infos]
        warned = [r for r in caplog.records if r.levelname == "WARNING" and "raise iters" in r.getMessage()]
        assert bool(warned) == (iters == 0)
    assert all(f > 50 for f in fractions[0])  # h starts at the fractional parts
    assert all(f < 10 for f in fractions[200])


def test_init_solver_takes_arguments():
    spec = QuantSpec(3, symmetric=False, group_size=32)
    step = get_step("adaround")
    model_a, ids = _tiny()
    compress(model_a, get_adapter(model_a), FormatPlan(weights=spec),
             [step(step.Args(iters=0, init={"rtn": {"observer": "mse"}}))], ids, progress=False)
    model_b, _ = _tiny()
    compress(model_b, get_adapter(model_b), FormatPlan(weights=spec), [build_step("rtn", {"observer": "mse"}, "rtn")],
             ids, progress=False)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_adaround_reports_once_per_block(caplog):
    model, ids = _tiny()
    step = get_step("adaround")
    with caplog.at_level("INFO", logger="lowbit"):
        compress(model, get_adapter(model), FormatPlan(weights=QuantSpec(2, symmetric=False, group_size=32)),
                 [step(step.Args(iters=0))], ids, progress=False)
    infos = [r.getMessage() for r in caplog.records if "undecided at hardening" in r.getMessage()]
    assert [m.split(":")[0] for m in infos] == ["model.layers.0", "model.layers.1"]


def test_init_step_is_prepared_before_the_blocks():
    """An init step's model-wide preparation runs too: BRECQ as AdaRound's init gets its Fisher weights."""
    step = build_step("adaround", {"iters": 0, "init": {"brecq": {"iters": 0, "fisher": True}}}, "adaround")
    assert step.needs_fp_targets  # BRECQ's targets are kept for it
    model, ids = _tiny()
    compress(model, get_adapter(model), FormatPlan(weights=QuantSpec(3, symmetric=False, group_size=32)), [step], ids,
             progress=False)
    assert [f.shape for f in step.init.fisher] == [(6, 32, 64)] * 2

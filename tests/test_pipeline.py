import pytest
import torch

from conftest import make_tiny
from lowbit.context import BlockContext, FormatPlan, ModelContext
from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import capture_block_inputs, compress, install_act_quantizers
from lowbit.state import QuantState
from lowbit.steps import Step, get_step


class _Probe(Step):
    """Records each block's quantized-path inputs and FP targets."""

    name = "probe"
    needs_fp_targets = True

    def __init__(self):
        super().__init__()
        self.seen: list[BlockContext] = []
        self.inputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def on_block(self, ctx):
        self.inputs.append(ctx.q_inputs.clone())
        self.targets.append(ctx.fp_outputs.clone())


@pytest.mark.parametrize("kind", ["llama", "opt", "qwen2"])
def test_block_inputs_match_hidden_states(kind, calib_ids):
    model = make_tiny(kind)
    hidden = model(calib_ids, output_hidden_states=True).hidden_states
    probe = _Probe()
    compress(model, get_adapter(model), FormatPlan(), [probe], calib_ids, progress=False)
    for i, x in enumerate(probe.inputs):
        torch.testing.assert_close(x, hidden[i], rtol=1e-5, atol=1e-5)
        if i + 1 < len(probe.inputs):
            torch.testing.assert_close(probe.targets[i], hidden[i + 1], rtol=1e-5, atol=1e-5)


def test_capture_runs_windows_one_at_a_time(calib_ids):
    model = make_tiny("llama")
    inputs, _args, kwargs = capture_block_inputs(model, get_adapter(model), calib_ids)
    assert inputs.shape == (4, 32, 64)
    assert kwargs["position_embeddings"][0].shape[0] == 1


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_no_formats_leaves_model_unchanged(kind, calib_ids):
    model = make_tiny(kind)
    ref = model(calib_ids).logits
    compress(model, get_adapter(model), FormatPlan(), [get_step("rtn")()], calib_ids, progress=False)
    torch.testing.assert_close(model(calib_ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("bits,bound", [(4, 0.5), (8, 0.05)])
def test_rtn_weights_on_grid_and_close(kind, bits, bound, calib_ids):
    model = make_tiny(kind)
    ref = model(calib_ids).logits
    spec = QuantSpec(bits=bits, symmetric=False, group_size=32)
    adapter = get_adapter(model)
    state = compress(model, adapter, FormatPlan(weights=spec), [get_step("rtn")()], calib_ids, progress=False)
    assert len(state.weights) == len(adapter.linear_order) * 2
    for name, rec in state.weights.items():
        w = model.get_submodule(name).weight
        codes = w.reshape(-1, 32) / rec.scale.reshape(-1, 1) + rec.zero.reshape(-1, 1)
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
        assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
    out = model(calib_ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 1e-5 < rel < bound


def test_mixed_precision_overrides(calib_ids):
    model = make_tiny("llama")
    plan = FormatPlan(weights=QuantSpec(bits=4), overrides=(("*.mlp.down_proj", QuantSpec(bits=8)),
                                                              ("*.0.self_attn.q_proj", None)))
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    state = compress(model, get_adapter(model), plan, [], calib_ids, progress=False)
    assert state.weights["model.layers.1.mlp.down_proj"].spec.bits == 8
    assert state.weights["model.layers.1.mlp.up_proj"].spec.bits == 4
    assert "model.layers.0.self_attn.q_proj" not in state.weights
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_next_block_reads_the_quantized_blocks_output(calib_ids):
    """Block 1's quantized-path input is block 0's output once block 0 is quantized, not the FP block's output."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    probe = _Probe()
    compress(model, adapter, FormatPlan(weights=QuantSpec(bits=2)), [probe], calib_ids, progress=False)
    _, args, kwargs = capture_block_inputs(model, adapter, calib_ids)
    with torch.no_grad():
        out = adapter.blocks(model)[0](probe.inputs[0], *args, **kwargs)
    quantized_out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(probe.inputs[1], quantized_out, rtol=1e-5, atol=1e-5)
    moved = (probe.inputs[1] - probe.targets[0]).norm() / probe.targets[0].norm()
    assert moved > 1e-3  # 2-bit weights change the block's output well beyond float rounding


def test_static_activation_quantizers_calibrated(calib_ids):
    model = make_tiny("opt")
    ref = model(calib_ids).logits
    acts = QuantSpec(bits=8, granularity="tensor", dynamic=False)
    state = compress(model, get_adapter(model), FormatPlan(weights=QuantSpec(bits=8), activations=acts),
                     [], calib_ids, progress=False)
    assert len(state.input_quantizers) == 12
    for q in state.input_quantizers.values():
        assert q.scale is not None and q.enabled and q.scale.item() > 0
    out = model(calib_ids).logits
    assert (out - ref).norm() / ref.norm() < 0.1
    state.uninstall()
    assert not torch.equal(model(calib_ids).logits, out)


def test_collect_stop_early_skips_the_rest_of_the_block(calib_ids):
    """stop_early sees the same inputs as a full pass, but the last listed module and what follows never run."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    inputs, args, kwargs = capture_block_inputs(model, adapter, calib_ids)
    block = adapter.blocks(model)[0]
    mctx = ModelContext(model, adapter, FormatPlan(batch_size=2), QuantState(), calib_ids)
    ctx = BlockContext(mctx, 0, block, inputs, args, kwargs)
    rels = ["self_attn.o_proj", "mlp.down_proj"]
    calls = {r: 0 for r in rels}
    hooks = [block.get_submodule(r).register_forward_hook(lambda _m, _a, _o, r=r: calls.__setitem__(r, calls[r] + 1))
             for r in rels]
    full: dict[str, list] = {r: [] for r in rels}
    early: dict[str, list] = {r: [] for r in rels}
    ctx.collect(rels, lambda r, x, y: full[r].append(x.clone()))
    assert calls == {r: 2 for r in rels}  # 4 windows in batches of 2
    ctx.collect(rels, lambda r, x, y: early[r].append(x.clone()) or (y is None) or pytest.fail("output given"),
                stop_early=True)
    assert calls == {"self_attn.o_proj": 4, "mlp.down_proj": 2}
    for r in rels:
        assert torch.equal(torch.cat(full[r]), torch.cat(early[r]))
    for h in hooks:
        h.remove()


def test_trial_rolls_back_the_block_and_its_quant_state(calib_ids):
    """Whatever a candidate changes inside `trial` (weights, norms, solved records, transforms, activation ranges,
    hooks) is as before afterwards, so the block computes exactly what it did."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    inputs, args, kwargs = capture_block_inputs(model, adapter, calib_ids)
    plan = FormatPlan(weights=QuantSpec(bits=4), activations=QuantSpec(bits=8, granularity="tensor", dynamic=False))
    mctx = ModelContext(model, adapter, plan, QuantState(), calib_ids)
    ctx = BlockContext(mctx, 0, adapter.blocks(model)[0], inputs, args, kwargs)
    install_act_quantizers(ctx)
    mctx.state.install(model, ctx.name + ".")
    ctx.round_to_nearest("self_attn.q_proj")
    ctx.calibrate_activations()
    before_out = ctx.forward()
    before_params = {n: p.clone() for n, p in ctx.block.named_parameters()}
    before_ranges = {n: q.scale.clone() for n, q in mctx.state.input_quantizers.items()}
    before_records = dict(mctx.state.weights)
    with ctx.trial():
        ctx.block.input_layernorm.weight.data.mul_(3)
        for rel in ctx.pending():
            ctx.round_to_nearest(rel)
        mctx.state.transforms[ctx.full_name("mlp.down_proj")] = {"kind": "hadamard", "size": 128}
        mctx.state.install(model, ctx.name + ".")
        for q in ctx.act_quantizers().values():
            q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
        assert not torch.equal(ctx.forward(), before_out)
    assert ctx.quantized == {"self_attn.q_proj"} and mctx.state.weights == before_records
    assert not mctx.state.transforms
    for n, p in ctx.block.named_parameters():
        assert torch.equal(p, before_params[n]), n
    for n, q in mctx.state.input_quantizers.items():
        assert torch.equal(q.scale, before_ranges[n]), n
    assert torch.equal(ctx.forward(), before_out)


def test_cpu_block_calls_of_fewer_windows_give_the_same_bits(calib_ids, monkeypatch):
    """On the CPU a weight-only block runs CPU_CALL_TOKENS tokens per call; statistics still see the plan's
    batches, so GPTQ's result and the propagated outputs are the same bits as with one call per batch."""
    from lowbit import context

    def run(call_tokens: int):
        monkeypatch.setattr(context, "CPU_CALL_TOKENS", call_tokens)
        model = make_tiny("llama")
        adapter = get_adapter(model)
        calls = []
        for block in adapter.blocks(model):
            block.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))

        class _Outputs(_Probe):
            needs_fp_targets = False

            def on_block(self, ctx):
                self.inputs.append(ctx.q_inputs.clone())
                ctx.collect(["mlp.down_proj"], lambda _r, x, _y: self.targets.append(x.shape[0]))

        probe = _Outputs()
        state = compress(model, adapter, FormatPlan(weights=QuantSpec(bits=3, group_size=16), batch_size=2),
                         [probe, get_step("gptq")()], calib_ids, progress=False)
        return state, probe, calls, model

    big, probe_big, calls_big, model_big = run(1024)
    small, probe_small, calls_small, model_small = run(calib_ids.shape[1])  # one window per call
    assert set(calls_big) == {2} and set(calls_small) == {1}
    assert probe_small.targets == probe_big.targets == [2, 2] * 2  # statistics: 4 windows in batches of 2, 2 blocks
    for a, b in zip(probe_small.inputs, probe_big.inputs):
        assert torch.equal(a, b)
    for (name, a), b in zip(model_small.state_dict().items(), model_big.state_dict().values()):
        assert torch.equal(a, b), name
    for name, rec in big.weights.items():
        assert torch.equal(small.weights[name].scale, rec.scale), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prepared_gated_mlp_gives_the_same_bits_and_leaves_hooked_outputs_alone(kind, calib_ids, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_GEMM", "torch")  # the products as transformers computes them (see test_gemm)
    model, prepared = make_tiny(kind), make_tiny(kind)
    get_adapter(prepared).prepare(prepared)
    ids = calib_ids[:2]
    mlp, ref_mlp = prepared.model.layers[0].mlp, model.model.layers[0].mlp
    assert mlp.forward != type(mlp).forward.__get__(mlp)  # the instance forward is the prepared one
    seen = []
    mlp.gate_proj.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, model(ids).logits)
        x, gate_out = seen[0]
        assert torch.equal(gate_out, mlp.gate_proj(x))  # the module output a hook holds was not overwritten
    x = torch.randn(2, 5, 64, requires_grad=True)  # with gradients: the same values and gradients out of place
    y, y_ref = mlp(x), ref_mlp(x)
    assert torch.equal(y, y_ref)
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.equal(g, g_ref)

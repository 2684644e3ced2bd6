"""Block reconstruction on a tiny Llama block: QDrop's limits (drop 0 = BRECQ with quantized activations,
drop 1 = weight-only reconstruction on FP inputs), determinism, and the Fisher-weighted BRECQ variant."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import BlockContext, FormatPlan, ModelContext, capture_block_inputs, install_act_quantizers
from lowbit.reconstruction import BlockReconArgs, reconstruct_block, reconstruct_layers
from lowbit.state import QuantState
from lowbit.steps.brecq import fisher_diagonal

WEIGHTS = QuantSpec(2, symmetric=False, group_size=32)
STATIC_A4 = QuantSpec(4, granularity="tensor")
ARGS = BlockReconArgs(iters=12, batch_size=2, seed=3)


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))


def _block_ctx(acts=STATIC_A4):
    """Block 0 with FP targets; its quantized-path inputs are the FP inputs plus noise (a stand-in for the
    error of earlier quantized blocks) so the two input sources differ."""
    model, ids = _model()
    adapter = get_adapter(model)
    x, args, kwargs = capture_block_inputs(model, adapter, ids)
    mctx = ModelContext(model, adapter, FormatPlan(weights=WEIGHTS, activations=acts), QuantState(), ids)
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ctx = BlockContext(mctx, 0, adapter.blocks(model)[0], noisy, args, kwargs, fp_inputs=x)
    ctx.fp_outputs = ctx.forward(x)
    install_act_quantizers(ctx)
    mctx.state.install(model, ctx.name + ".")
    return ctx


def _weights(ctx):
    return {rel: lin.weight.detach().clone() for rel, lin in ctx.linears().items()}


def _scales(ctx):
    return [q.scale.detach().clone() for q in ctx.act_quantizers().values()]


def test_drop_zero_is_brecq_with_quantized_activations():
    a, b = _block_ctx(), _block_ctx()
    loss_qdrop = reconstruct_block(a, ARGS, quantize_acts=True, drop=0.0)
    loss_brecq = reconstruct_block(b, ARGS, quantize_acts=True)
    assert loss_qdrop == loss_brecq
    assert all(torch.equal(_weights(a)[r], _weights(b)[r]) for r in _weights(a))
    assert all(torch.equal(s, t) for s, t in zip(_scales(a), _scales(b)))
    assert any(not torch.equal(s, t) for s, t in zip(_scales(a), _scales(_block_ctx_calibrated())))  # LSQ moved


def _block_ctx_calibrated():
    ctx = _block_ctx()
    reconstruct_block(ctx, ARGS.model_copy(update={"iters": 0}), quantize_acts=True)
    return ctx


def test_drop_one_is_weight_only_reconstruction_on_fp_inputs():
    a, b, c = _block_ctx(), _block_ctx(), _block_ctx()
    loss_qdrop = reconstruct_block(a, ARGS, quantize_acts=True, drop=1.0)
    loss_weight_only = reconstruct_block(b, ARGS, quantize_acts=False, use_fp_inputs=True)
    loss_quantized = reconstruct_block(c, ARGS, quantize_acts=True)
    assert loss_qdrop == loss_weight_only
    assert all(torch.equal(_weights(a)[r], _weights(b)[r]) for r in _weights(a))
    assert loss_quantized[0] > loss_weight_only[0]  # the activation quantizers were really in the loop


def test_drop_is_switched_off_after_the_block():
    ctx = _block_ctx()
    reconstruct_block(ctx, ARGS.model_copy(update={"iters": 2}), quantize_acts=True, drop=0.5)
    for q in ctx.act_quantizers().values():
        assert not q._forward_hooks and not q.scale.requires_grad
    x = ctx.q_inputs[:2]
    assert torch.equal(ctx.run(x), ctx.run(x))  # no randomness left in the block


@pytest.mark.parametrize("kind", ["qdrop", "adaround"])
def test_reconstruction_is_deterministic_for_a_seed(kind):
    def run(seed):
        ctx = _block_ctx()
        args = ARGS.model_copy(update={"iters": 6, "seed": seed})
        if kind == "qdrop":
            losses = reconstruct_block(ctx, args, quantize_acts=True, drop=0.5)
        else:
            losses = reconstruct_layers(ctx, args)
        return losses, _weights(ctx)
    (loss_a, w_a), (loss_b, w_b), (loss_c, w_c) = run(0), run(0), run(5)
    assert loss_a == loss_b and all(torch.equal(w_a[r], w_b[r]) for r in w_a)
    assert loss_a != loss_c


def test_fisher_is_the_squared_output_gradient_scaled_to_mean_one():
    model, ids = _model()
    adapter = get_adapter(model)
    fisher = fisher_diagonal(model, adapter, ids[:2])
    assert len(fisher) == 2 and fisher[1].shape == (2, 32, 64)
    grads = []
    for row in ids[:2]:  # reference: autograd of the summed next-token loss w.r.t. the last block's output
        hidden = {}
        handle = adapter.blocks(model)[1].register_forward_hook(
            lambda _m, _a, out: hidden.setdefault("h", out[0] if isinstance(out, tuple) else out))
        logits = model(row[None]).logits[0, :-1]
        handle.remove()
        loss = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        grads.append(torch.autograd.grad(loss, hidden["h"])[0].pow(2))
    expected = torch.cat(grads)
    expected = expected / expected.mean()
    assert torch.allclose(fisher[1].float(), expected, rtol=1e-2, atol=1e-3 * expected.max().item())

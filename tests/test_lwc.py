import copy

import torch

from lowbit.formats import QuantSpec, dequantize, quantize
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps.lwc import LWC, ClippedWeight
from solver_utils import block_contexts, tiny_llama

SPEC = QuantSpec(3, symmetric=False, group_size=32)


def _block_error(ctx, step):
    """Block output MSE against FP targets after `step` quantized the block."""
    step.on_block(ctx)
    return ((ctx.forward() - ctx.fp_outputs) ** 2).mean().item()


def test_training_lowers_block_output_error():
    model = tiny_llama()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = next(block_contexts(model, SPEC, ids))
    ctx.fp_outputs = ctx.forward()
    original = copy.deepcopy(ctx.block.state_dict())
    untrained = _block_error(ctx, LWC(LWC.Args(epochs=0)))
    ctx.block.load_state_dict(original)
    ctx.quantized.clear()
    trained = _block_error(ctx, LWC(LWC.Args(epochs=10, lr=5e-2, batch_size=1)))
    assert trained < 0.95 * untrained
    for rel, rec in ctx.state.weights.items():
        w = model.get_submodule(rel).weight.data
        assert torch.equal(dequantize(quantize(w, rec.scale, rec.zero, SPEC), rec.scale, rec.zero, SPEC), w)
    assert all(p.requires_grad for p in ctx.block.parameters())  # training state restored


def test_clipping_factors_get_gradients_for_min_and_max():
    w = torch.randn(8, 64)
    clip = ClippedWeight(w, SPEC, init=2.0)
    ((clip(w) - w * 1.1) ** 2).sum().backward()
    assert clip.up.grad.abs().sum() > 0 and clip.low.grad.abs().sum() > 0


def test_lwc_in_the_pipeline_is_finite():
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    state = compress(model, get_adapter(model), FormatPlan(weights=SPEC), [LWC(LWC.Args(epochs=2))], ids,
                     progress=False)
    assert len(state.weights) == 14
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""QLLM channel reassembly: exact where the paper's merge is exact, bounded by its error formula elsewhere,
removes outliers above the threshold, and works inside the pipeline (with LoRA tuning) on a tiny model."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress
from lowbit.steps.qllm import QLLM, QLLMArgs, Reassembly, plan_reassembly, splits_for, threshold_for_budget


def layer_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=gen, dtype=torch.float64)
    x[:, 2] *= 20  # an outlier channel
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    return x, w


def plan_for(x, w, extra):
    amax = x.abs().amax(0)
    return plan_reassembly(amax, x.T @ x, w.T @ w, threshold_for_budget(amax, extra)), amax


def test_reassembly_is_exact_when_merged_channels_are_identical():
    x, w = layer_problem()
    x[:, 7] = x[:, 5]  # identical activations: merging 5 and 7 costs nothing
    plan, amax = plan_for(x, w, extra=1)
    assert int((splits_for(amax, threshold_for_budget(amax, 1)) - 1).sum()) == 1
    assert len(plan.src_a) == 16  # width kept
    y = plan.apply_input(x) @ plan.apply_weight(w).T
    assert torch.allclose(y, x @ w.T, rtol=1e-10, atol=1e-10)


def test_reassembly_error_matches_merge_formula_and_clips_outliers():
    x, w = layer_problem(1)
    plan, amax = plan_for(x, w, extra=3)
    t = threshold_for_budget(amax, 3)
    xr = plan.apply_input(x)
    assert xr.abs().max() <= t + 1e-9 < amax.max()  # every reassembled channel is within the threshold
    err = plan.apply_input(x) @ plan.apply_weight(w).T - x @ w.T
    predicted = torch.zeros_like(err)
    for c in torch.nonzero(plan.src_b >= 0).flatten().tolist():
        a, b = plan.src_a[c], plan.src_b[c]
        xa, xb = 2 * plan.coef_a[c] * x[:, a], 2 * plan.coef_b[c] * x[:, b]
        predicted -= torch.outer(xa - xb, w[:, a] - w[:, b]) / 2
    assert torch.allclose(err, predicted, atol=1e-9)
    roundtrip = Reassembly.from_config(plan.config())
    assert torch.equal(roundtrip.apply_input(x), xr)


def test_cheapest_pairs_are_merged():
    x, w = layer_problem(2)
    plan, _ = plan_for(x, w, extra=2)
    random_pairs = Reassembly(plan.src_a.clone(), plan.src_b.clone(), plan.coef_a, plan.coef_b)
    merged = torch.nonzero(plan.src_b >= 0).flatten()
    singles = torch.nonzero(plan.src_b < 0).flatten()
    random_pairs.src_b[merged] = plan.src_a[singles[-len(merged):]]
    err = (plan.apply_input(x) @ plan.apply_weight(w).T - x @ w.T).norm()
    worse = (random_pairs.apply_input(x) @ random_pairs.apply_weight(w).T - x @ w.T).norm()
    assert err < worse


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False  # as lowbit.loading does: no KV cache kept across calibration calls
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 30.0  # outlier channels in the norm outputs
            layer.post_attention_layernorm.weight[10] = 25.0
    return model


def block_output_error(model, ids, plan, steps):
    adapter = get_adapter(model)
    fp = model(ids).logits
    state = compress(model, adapter, plan, steps, ids, progress=False)
    return ((model(ids).logits - fp).norm() / fp.norm()).item(), state


def test_qllm_in_pipeline_beats_rtn_and_lora_helps():
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = FormatPlan(weights=QuantSpec(bits=8), activations=QuantSpec(bits=4, granularity="token", dynamic=True,
                                                                         symmetric=False))
    rtn, _ = block_output_error(tiny_llama(), ids, plan, [])
    qllm, state = block_output_error(tiny_llama(), ids, plan, [QLLM(QLLMArgs(channel_ratio=0.1))])
    lora, _ = block_output_error(tiny_llama(), ids, plan,
                                 [QLLM(QLLMArgs(channel_ratio=0.1, lora_rank=4, epochs=5, lr=1e-3))])
    assert any(cfg["kind"] == "reassembly" for cfg in state.transforms.values())
    assert qllm < rtn
    assert lora < qllm

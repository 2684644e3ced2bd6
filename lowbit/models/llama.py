"""LLaMA family: Llama, Mistral, Qwen2, SmolLM (RMSNorm, bias-free or QKV-bias linears, SwiGLU MLP)."""
from lowbit.models.base import Adapter, LinearPair, NormGroup
from lowbit.models.registry import register_adapter

LLAMA = register_adapter(Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks_path="model.layers",
    embedding_paths=("model.embed_tokens",),
    final_norm_path="model.norm",
    head_path="lm_head",
    norm_kind="rmsnorm",
    norm_groups=(
        NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), inspect="self_attn"),
        NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    ),
    linear_pairs=(
        LinearPair("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
        LinearPair("mlp.up_proj", ("mlp.down_proj",)),
    ),
    attention="self_attn",
    mlp_out="mlp.down_proj",
    linear_order=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
))

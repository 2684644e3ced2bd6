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
    attn_out="self_attn.o_proj",
    kv_linears=("self_attn.k_proj", "self_attn.v_proj"),
    mlp_out="mlp.down_proj",
    gated_mlp="mlp",
    linear_order=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    gguf_archs=(("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")),
    gguf_interleaved_rope=("llama",),
    gguf_block_names=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
                      ("self_attn.k_norm", "attn_k_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                      ("post_attention_layernorm", "ffn_norm")),
    gguf_model_names=(("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")),
))

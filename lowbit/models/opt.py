"""OPT: LayerNorm with bias before attention and MLP, biased linears, ReLU MLP (fc1 -> fc2)."""
from lowbit.models.base import Adapter, LinearPair, NormGroup
from lowbit.models.registry import register_adapter

OPT = register_adapter(Adapter(
    name="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    embedding_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    final_norm_path="model.decoder.final_layer_norm",
    head_path="lm_head",
    norm_kind="layernorm",
    norm_groups=(
        NormGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  inspect="self_attn"),
        NormGroup("final_layer_norm", ("fc1",)),
    ),
    linear_pairs=(LinearPair("self_attn.v_proj", ("self_attn.out_proj",), heads=True),),
    attention="self_attn",
    attn_out="self_attn.out_proj",
    kv_linears=("self_attn.k_proj", "self_attn.v_proj"),
    mlp_out="fc2",
    linear_order=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    pre_norm_flag="do_layer_norm_before",  # False for OPT-350m
))

"""Shared helpers for the weight-solver tests: tiny random models and a manual block loop."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lowbit.formats import QuantSpec
from lowbit.models import get_adapter
from lowbit.pipeline import BlockContext, FormatPlan, ModelContext, capture_block_inputs
from lowbit.state import QuantState


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    _randomize_norms(model)
    return model


def tiny_opt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    model = OPTForCausalLM(cfg).eval()
    model.config.use_cache = False
    _randomize_norms(model)
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm weights and biases, so folding mistakes show up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)


def block_contexts(model, spec: QuantSpec | None, ids: torch.Tensor):
    """Yield a BlockContext per block (quantized-path inputs propagated), like `compress` without rounding."""
    adapter = get_adapter(model)
    mctx = ModelContext(model, adapter, FormatPlan(weights=spec), QuantState(), ids)
    x, args, kwargs = capture_block_inputs(model, adapter, ids)
    for i, block in enumerate(adapter.blocks(model)):
        ctx = BlockContext(mctx, i, block, x, args, kwargs)
        yield ctx
        x = ctx.forward()

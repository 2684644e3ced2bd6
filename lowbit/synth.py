"""Random-weight models of real shapes (Llama 3.x configs) as bf16 safetensors shards, for memory and time.

The weights are written one decoder block per shard, so a model larger than memory can be made; random weights
say nothing about quality. The tokenizer is the embedded model's (its ids fit in every vocabulary here).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
               bos_token_id=128000, eos_token_id=128001, hidden_act="silu", attention_bias=False, mlp_bias=False)
_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_parameters={**_ROPE, "factor": 32.0}),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         rope_parameters={**_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_parameters={**_ROPE, "factor": 8.0}),
}


def synth_model(shape: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                layers: int | None = None) -> Path:
    """Write a random model of `shape` (optionally with fewer `layers`) to `out`, atomically; returns `out`."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit import streaming
    from lowbit.loading import embedded_model_path
    from lowbit.models import get_adapter

    if shape not in SHAPES:
        raise LowbitError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    out = Path(out)
    if out.exists():
        raise LowbitError(f"{out} already exists: remove it or choose another folder")
    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}, dtype=dtype)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    adapter = get_adapter(model)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop(adapter.head_path + ".weight", None)
    names = list(shapes)
    n = config.num_hidden_layers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        gen = torch.Generator().manual_seed(seed)
        groups = [streaming.block_names(adapter, names, i) for i in range(n)] + [streaming.rest_names(adapter, names)]
        for k, group in enumerate(groups):
            tensors = {name: _random(shapes[name], name, gen, dtype) for name in group}
            streaming.write_shard(tmp, k, n + 1, tensors)
            del tensors
        streaming.write_index(tmp)
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _random(shape: torch.Size, name: str, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm scales near 1, other weights N(0, 0.02) (the Llama initializer's scale)."""
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

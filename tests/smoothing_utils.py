"""Shared helpers for the smoothing/outlier-suppression tests: tiny models with outliers, real text, logits checks."""
from __future__ import annotations

import functools

import torch
from conftest import VOCAB, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.models import get_adapter
from lowbit.pipeline import FormatPlan, compress


@functools.lru_cache(maxsize=1)
def tokens() -> torch.Tensor:
    return tokenize(tiny_tokenizer(), load_text("wikitext2", "validation")[:200_000])


def windows(n: int, seq_len: int, seed: int) -> torch.Tensor:
    return calibration_windows(tokens(), n, seq_len, seed)


def _add_outliers(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give norms a few large, sign-mixed gamma channels and LayerNorm biases, as trained LLMs have."""
    gen = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    with torch.no_grad():
        for block in adapter.blocks(model):
            for group in adapter.norm_groups:
                norm = block.get_submodule(group.norm)
                w = 1 + 0.3 * torch.randn(norm.weight.shape, generator=gen)
                w[torch.randint(0, w.numel(), (3,), generator=gen)] *= 20
                norm.weight.copy_(w)
                if getattr(norm, "bias", None) is not None:
                    b = 0.2 * torch.randn(norm.bias.shape, generator=gen)
                    b[torch.randint(0, b.numel(), (3,), generator=gen)] += 5
                    norm.bias.copy_(b)
    model.config.use_cache = False
    return model.eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return _add_outliers(LlamaForCausalLM(cfg), seed)


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, enable_bias=True)
    model = OPTForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "layer_norm" not in name:
                p.normal_(0, 0.1)
    return _add_outliers(model, seed)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def transformed_rel_err(model, step, calib: torch.Tensor, ids: torch.Tensor, plan: FormatPlan | None = None) -> float:
    """Relative logits change on `ids` after running `step` alone (no quantization unless `plan` says so)."""
    before = logits(model, ids)
    state = compress(model, get_adapter(model), plan or FormatPlan(), [step], calib, progress=False)
    state.install(model)
    return rel_err(logits(model, ids), before)

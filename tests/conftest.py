"""Shared fixtures: tiny random LLaMA/OPT/Qwen2 models (with the embedded model's tokenizer) and the embedded model."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from lowbit.loading import embedded_model_path

torch.set_num_threads(2)
VOCAB = 49152


def tiny_config(kind: str):
    if kind == "llama":
        return LlamaForCausalLM, LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512)
    if kind == "opt":
        return OPTForCausalLM, OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512)
    raise ValueError(kind)


def make_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model whose weights have LLM-like outlier channels (so quantization is not trivial)."""
    cls, cfg = tiny_config(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.config.use_cache = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.05)
                p[:, :2] *= 8
    return model


@pytest.fixture(scope="session")
def embedded_path() -> str:
    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    return AutoTokenizer.from_pretrained(embedded_path)


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    """Saved tiny models, loadable by path like any HF folder."""
    out = {}
    for kind in ("llama", "opt", "qwen2"):
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        make_tiny(kind).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[kind] = str(d)
    return out


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M and a few short real calibration windows from WikiText-2 validation.

    Shared across tests: a test that changes the model must work on a copy."""
    from lowbit.data import calibration_windows, load_text, tokenize
    from lowbit.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 4, 256, 0)
    return model, ids

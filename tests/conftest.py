"""Shared fixtures: tiny random LLaMA/OPT/Qwen2 models with a tiny BPE tokenizer built here, and the embedded model
(only for tests marked slow)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

from lowbit.data import load_text

torch.set_num_threads(2)
VOCAB = 512  # the tiny tokenizer's vocabulary, used by every tiny config


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB tokens trained on 200k characters of WikiText-2 validation (about a
    second), so tiny-model tests read real text without the embedded model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([load_text("wikitext2", "validation")[:200000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


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


def _require_slow(request) -> None:
    """Only tests marked slow may load the embedded model, so `make test-fast` never does."""
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.name} loads the embedded model: mark it @pytest.mark.slow")


@pytest.fixture
def embedded_path(request) -> str:
    from lowbit.loading import embedded_model_path

    _require_slow(request)
    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


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
def _embedded_shared():
    from lowbit.data import calibration_windows, tokenize
    from lowbit.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation")), 4, 256, 0)
    return model, ids


@pytest.fixture
def embedded(request, _embedded_shared):
    """The embedded SmolLM2-135M and a few short real calibration windows from WikiText-2 validation.

    Shared across tests: a test that changes the model must work on a copy."""
    _require_slow(request)
    return _embedded_shared


# --- export tests: a tiny Llama with the tiny tokenizer, saved runs of it, text windows ---

@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-block Llama (hidden 64, GQA 4/2 heads) with the tiny tokenizer; its initialization is wide enough that
    logits vary and comparisons mean something."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.1, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_run(tiny_llama, tmp_path_factory):
    """Factory: a saved RTN run of the tiny Llama with the given weight / activation formats (cached per formats)."""
    from lowbit.recipe import parse_recipe
    from lowbit.run import run_recipe

    cache: dict[str, Path] = {}

    def make(weights: dict, activations: dict | None = None) -> Path:
        key = repr((sorted(weights.items()), sorted((activations or {}).items())))
        if key not in cache:
            recipe = parse_recipe({"model": str(tiny_llama), "weights": weights, "activations": activations,
                                   "threads": 1, "evaluation": None, "calibration": {"n_samples": 2, "seq_len": 64}})
            out = tmp_path_factory.mktemp("run") / "run"
            run_recipe(recipe, out, progress=False)
            cache[key] = out
        return cache[key]
    return make


@pytest.fixture(scope="session")
def text_windows(tiny_llama) -> torch.Tensor:
    """Three 128-token windows of WikiText-2 test text."""
    from lowbit.data import eval_windows, tokenize

    return eval_windows(tokenize(tiny_tokenizer(), load_text("wikitext2", "test")[:20000]), 128, 384)

"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, and saved runs of it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch



@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-block Llama (hidden 64, GQA 4/2 heads) with a 512-token byte-level BPE tokenizer trained on
    WikiText-2; its initialization is wide enough that logits vary and comparisons mean something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lowbit.data import load_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([load_text("wikitext2", "validation")[:200000]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
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
    from transformers import AutoTokenizer

    from lowbit.data import eval_windows, load_text, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")[:20000]), 128, 384)

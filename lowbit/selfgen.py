"""Calibration text the model writes itself (data-free quantization, as in LLM-QAT): each sequence starts from a
token drawn uniformly from the non-special vocabulary and continues by sampling the model's own next-token
distribution. Sampling is seeded per chunk of CHUNK sequences and each chunk is cached on disk, keyed by model
files, dtype, seed and length, so the first n sequences of a seed are the same whatever the number asked for."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.files import sweep_leftovers, write_atomic
from lowbit.loading import cache_dir, model_file_stamps

log = logging.getLogger("lowbit")
CHUNK = 8  # sequences sampled together (one batch) and cached in one file


def model_key(model_path: str, model: nn.Module) -> str:
    """Identify the model a generated text came from: its files (name, size, mtime), dtype and torch version."""
    parts = [str(model_path), str(next(model.parameters()).dtype), torch.__version__]
    parts += model_file_stamps(model_path)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@torch.no_grad()
def sample(model: nn.Module, first: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Continue each first token [b] to `length` tokens [b, length] by sampling the model (temperature 1)."""
    device = next(model.parameters()).device
    ids, past, step = [first[:, None]], None, first[:, None]
    for _ in range(length - 1):
        out = model(step.to(device), cache=past, use_cache=True)
        past = out.cache
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
        step = torch.multinomial(probs, 1, generator=generator)
        ids.append(step)
    return torch.cat(ids, dim=1)


def _chunk(model: nn.Module, tokenizer, key: str, seq_len: int, seed: int, index: int) -> torch.Tensor:
    """Chunk `index` of the generated text for `seed`: read from the cache, else sampled and cached."""
    folder = cache_dir() / "selfgen"
    path = folder / f"{key}-seed{seed}-len{seq_len}-chunk{index}.pt"
    try:
        ids = torch.load(path, weights_only=True)
        if isinstance(ids, torch.Tensor) and ids.shape == (CHUNK, seq_len):
            return ids
    except (OSError, RuntimeError, EOFError):
        pass  # missing or damaged: sample it again
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(model.config.vocab_size) if i not in special and i < len(tokenizer)])
    first = vocab[torch.randint(len(vocab), (CHUNK,), generator=gen)]
    ids = sample(model, first, seq_len, gen)
    buf = io.BytesIO()
    torch.save(ids, buf)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(folder)
        write_atomic(path, buf.getvalue())
    except OSError as exc:
        log.warning("could not cache self-generated calibration text in %s (%s)", folder, exc.strerror or exc)
    return ids


def generated_windows(model: nn.Module, tokenizer, key: str, n_samples: int, seq_len: int, seed: int,
                      progress: bool = True) -> torch.Tensor:
    """`n_samples` sequences of `seq_len` tokens the model wrote itself, [n_samples, seq_len], cached."""
    chunks = -(-n_samples // CHUNK)
    parts = [_chunk(model, tokenizer, key, seq_len, seed, i)
             for i in tqdm(range(chunks), desc="self-generated calibration text", disable=not progress)]
    return torch.cat(parts)[:n_samples]

"""Text sources and token windows: shipped WikiText-2 or LAMBADA passages, a text or JSONL file, or a HF dataset id."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.loading import hub_quiet

WIKITEXT2 = Path(__file__).parent / "wikitext2"
SHIPPED = {"wikitext2": WIKITEXT2, "lambada": Path(__file__).parent / "lambada"}  # name -> folder (see its README)
_SPLITS = {"test": "test.txt", "validation": "valid.txt", "valid": "valid.txt"}


def load_text(source: str, split: str = "test") -> str:
    """Raw text of `source`: 'wikitext2' or 'lambada' (shipped, by split), a .txt file, a .jsonl file with a
    'text' field, or a Hugging Face dataset id 'name' or 'name:config' (needs the datasets package and a hub)."""
    if source in SHIPPED:
        if split not in _SPLITS:
            raise LowbitError(f"{source} has splits test and validation, not {split!r}")
        return (SHIPPED[source] / _SPLITS[split]).read_text(encoding="utf-8")
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.exists())
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists() or looks_local:
        if not path.is_file():
            raise LowbitError(f"text file {source} does not exist: give a .txt or .jsonl file, or 'wikitext2'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LowbitError(f"text file {source} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start}): convert it to UTF-8") from None
        except OSError as exc:
            raise LowbitError(f"cannot read text file {source}: {exc.strerror or exc}") from None
        return _read_jsonl(path, text) if path.suffix in (".jsonl", ".json") else text
    return _load_hf_dataset(source, split)


def _read_jsonl(path: Path, content: str) -> str:
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path}:{lineno} is not valid JSON ({exc.msg}): one JSON object per line") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LowbitError(f"{path}:{lineno} has no string field 'text': each line needs {{\"text\": ...}}")
        texts.append(row["text"])
    return "\n\n".join(texts)


def _load_hf_dataset(source: str, split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise LowbitError(f"{source!r} is not a local file; loading it as a HF dataset needs "
                          f"'pip install datasets' (or use 'wikitext2' or a .txt/.jsonl file)") from exc
    name, _, config = source.partition(":")
    try:
        with hub_quiet():
            ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types for a missing dataset
        raise LowbitError(f"could not load dataset {source!r} split {split!r}: {str(exc).splitlines()[0]} "
                          f"(shipped texts: {', '.join(SHIPPED)}; or a .txt/.jsonl file, or a Hub dataset "
                          f"'name[:config]')") from exc
    if "text" not in ds.column_names:
        raise LowbitError(f"dataset {source!r} has no 'text' column (it has {', '.join(ds.column_names)}): give a "
                          f"dataset with a text column, or a .txt/.jsonl file")
    return "\n\n".join(str(t) for t in ds["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids, without special tokens (windows are cut from it)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens, [n_samples, seq_len], reproducible for a seed."""
    if tokens.numel() <= seq_len:
        raise LowbitError(f"calibration text has {tokens.numel()} tokens, fewer than seq_len {seq_len}: "
                          f"use a longer text or a smaller calibration seq_len")
    return torch.stack([tokens[s: s + seq_len] for s in window_starts(tokens.numel(), n_samples, seq_len, seed)])


def window_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of the calibration windows (so held-out windows can avoid them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen).tolist()


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [k, seq_len] from the start of the text, at most `max_tokens` tokens."""
    total = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    k = total // seq_len
    if k == 0:
        raise LowbitError(f"evaluation needs at least seq_len={seq_len} tokens, got {total}: "
                          f"lower eval seq_len or raise max_tokens")
    return tokens[: k * seq_len].reshape(k, seq_len)

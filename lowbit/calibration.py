"""Calibration windows from the recipe's sources: one text, text the model writes itself, or a weighted mix."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.recipe import CalibrationConfig
from lowbit.selfgen import generated_windows, model_key

SELF = "self"  # the source name of self-generated text


def window_counts(weights: list[float], n: int) -> list[int]:
    """Windows per source: n split by weight, rounded so the counts sum to exactly n (largest remainder)."""
    exact = [w * n for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_set(model: nn.Module, tokenizer, model_path: str, cal: CalibrationConfig,
                    progress: bool = True) -> torch.Tensor:
    """The calibration windows [n_samples, seq_len]: each source's share of them (a mix is interleaved in a
    seeded order), reproducible for a seed."""
    mix = cal.mix()
    counts = window_counts([w for _, w in mix], cal.n_samples)
    empty = [name for (name, _), k in zip(mix, counts) if k == 0]
    if empty:
        raise LowbitError(f"calibration.n_samples {cal.n_samples} leaves no window for {empty[0]} in the mix: raise "
                          f"n_samples or drop that source")
    parts = []
    for (name, _), k in zip(mix, counts):
        if name == SELF:
            if any(p.is_meta for p in model.parameters()):
                raise LowbitError("calibration.data self samples the whole model, which is streamed from disk here: "
                                  "set stream: false")
            parts.append(generated_windows(model, tokenizer, model_key(model_path, model), k, cal.seq_len, cal.seed,
                                           progress))
        else:
            parts.append(calibration_windows(tokenize(tokenizer, load_text(name, cal.split)), k, cal.seq_len, cal.seed))
    windows = torch.cat(parts)
    if len(parts) == 1:
        return windows
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(cal.seed))
    return windows[order]

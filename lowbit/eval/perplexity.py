"""Perplexity over non-overlapping windows: exp(mean next-token NLL), with the token count reported."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import distributed
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    """Each window [k, seq_len] is scored independently; the first token of a window is context only. Under
    torchrun each rank scores its strided share of the windows and the sums are combined."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context and windows.shape[1] > context:
        raise LowbitError(f"evaluation windows of {windows.shape[1]} tokens are longer than the model's context "
                          f"({context} positions): use a seq_len of at most {context}")
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    mine = distributed.shard(windows)
    for i in tqdm(range(0, mine.shape[0], batch_size), desc=desc, disable=not progress):
        batch = mine[i: i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        target = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        total_tokens += target.numel()
    total_nll, total_tokens = distributed.reduce_float(total_nll), int(distributed.reduce_float(total_tokens))
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, windows.shape[0], windows.shape[1])

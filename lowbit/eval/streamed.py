"""Perplexity of a model that does not fit in memory: a layer-by-layer forward over all evaluation windows.

The skeleton holds the embeddings, final norm and head; each decoder block is read from its shards, run
over every window's hidden states, and freed. The tail (norm, head) is the model's own forward, so the
numbers equal `perplexity` on the whole model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import streaming
from lowbit.blockio import to_device
from lowbit.eval.perplexity import PerplexityResult
from lowbit.models.base import Adapter
from lowbit.pipeline import capture_block_inputs
from lowbit.state import QuantState


@torch.no_grad()
def streamed_perplexity(model: nn.Module, adapter: Adapter, reader: streaming.ShardReader, windows: torch.Tensor,
                        dtype: torch.dtype, device: torch.device = torch.device("cpu"), batch_size: int = 1,
                        state: QuantState | None = None, progress: bool = True,
                        desc: str = "perplexity") -> PerplexityResult:
    """Each window is scored independently, as in `perplexity`; `state` re-attaches activation quantizers."""
    hidden, args, kwargs = capture_block_inputs(model, adapter, windows)
    hidden, args, kwargs = to_device(hidden, device), to_device(args, device), to_device(kwargs, device)
    blocks = adapter.blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress):
        block = streaming.load_block(model, adapter, reader, i, dtype, device)
        if state is not None:
            state.install(model, adapter.block_name(i) + ".")
        for j in range(0, hidden.shape[0], batch_size):
            out = block(hidden[j: j + batch_size], *args, **kwargs)
            hidden[j: j + batch_size] = out[0] if isinstance(out, tuple) else out
        streaming.free(block)
    total_nll, total_tokens = 0.0, 0
    for j in range(windows.shape[0]):
        batch = windows[j: j + 1]
        logits = streaming.streamed_logits(model, adapter, hidden[j: j + 1].cpu(), batch)[:, :-1].float()
        target = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        total_tokens += target.numel()
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, windows.shape[0], windows.shape[1])

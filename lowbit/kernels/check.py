"""Does the real-kernel model compute what the simulated model computed? Logit differences, top-1, perplexity."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data import eval_windows, load_text, tokenize
from lowbit.kernels.runtime import load_for_inference


@torch.no_grad()
def compare(model_a: nn.Module, model_b: nn.Module, windows: torch.Tensor) -> dict:
    """Both models on the same token windows [k, T]: max / mean absolute logit difference, share of positions
    whose argmax agrees, and each model's perplexity (first token of each window is context only)."""
    max_diff, sum_diff, n_logits, agree, nll_a, nll_b, n_tokens = 0.0, 0.0, 0, 0, 0.0, 0.0, 0
    for row in windows:
        ids = row[None]
        la, lb = model_a(ids).logits[0].float(), model_b(ids).logits[0].float()
        diff = (la - lb).abs()
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.sum().item()
        n_logits += diff.numel()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        nll_a += F.cross_entropy(la[:-1], row[1:], reduction="sum").item()
        nll_b += F.cross_entropy(lb[:-1], row[1:], reduction="sum").item()
        n_tokens += row.numel() - 1
    positions = windows.numel()
    return {"max_logit_diff": max_diff, "mean_logit_diff": sum_diff / n_logits, "top1_agreement": agree / positions,
            "ppl_a": math.exp(nll_a / n_tokens), "ppl_b": math.exp(nll_b / n_tokens), "tokens": n_tokens}


class Perturbed(nn.Module):
    """A causal LM whose input embeddings are multiplied by (1 + rel * noise): float-rounding-sized input noise."""

    def __init__(self, model: nn.Module, rel: float = 1e-6, seed: int = 0):
        super().__init__()
        self.model, self.rel, self.seed = model, rel, seed

    def forward(self, ids: torch.Tensor):
        emb = self.model.get_input_embeddings()(ids)
        noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(self.seed))
        return self.model(inputs_embeds=emb * (1 + self.rel * noise))


def check_run(run_dir: str | Path, data: str = "wikitext2", split: str = "test", seq_len: int = 512,
              max_tokens: int = 4096, compute_dtype: str = "bfloat16", noise_floor: bool = False) -> dict:
    """Compare a run's simulated model (a) with its real-kernel model (b) on the start of a text.

    With `noise_floor`, also compare the simulated model with itself under 1e-6 relative input noise: models with
    quantized activations can amplify float rounding (a value crossing a rounding boundary), and that comparison
    shows how much disagreement any float implementation would have.
    """
    simulated, tokenizer, _ = load_for_inference(run_dir, "simulated")
    real, _, plans = load_for_inference(run_dir, "real", compute_dtype)
    windows = eval_windows(tokenize(tokenizer, load_text(data, split)), seq_len, max_tokens)
    result = {**compare(simulated, real, windows), "kernels": plans}
    if noise_floor:
        result["noise_floor"] = compare(simulated, Perturbed(simulated), windows)
    return result

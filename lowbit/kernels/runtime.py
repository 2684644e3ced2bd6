"""Load a run for inference on simulated or real kernels, and greedy text generation with the HF generate API."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.convert import LayerKernel, to_real
from lowbit.runfolder import load_run

Kernels = Literal["real", "simulated"]


COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_for_inference(run_dir: str | Path, kernels: Kernels = "real",
                       compute_dtype: str = "bfloat16") -> tuple[nn.Module, object, list[LayerKernel]]:
    """A saved run's model (float32) and tokenizer; with kernels='real' its quantized linears are packed, the
    weight-only kernels multiplying in `compute_dtype` (see `to_real`)."""
    if kernels not in ("real", "simulated"):
        raise LowbitError(f"kernels must be 'real' or 'simulated', not {kernels!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise LowbitError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
    model, tokenizer, state = load_run(run_dir)
    if kernels == "real":
        to_real(model, state, COMPUTE_DTYPES[compute_dtype])
    return model, tokenizer, getattr(model, "lowbit_kernels", [])


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` (KV cache on), decoded without the prompt."""
    if max_new_tokens <= 0:
        raise LowbitError(f"max_new_tokens must be positive, got {max_new_tokens}")
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise LowbitError("the prompt is empty: give some text with --prompt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, use_cache=True, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

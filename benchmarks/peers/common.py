"""Shared by the peer scripts, inside each peer's own venv (needs only torch and transformers).

A peer script reads the FP model folder and lowbit's calibration windows (written by `to_run.py windows`),
quantizes with the peer's own code, and hands its fake-quantized linear weights to `save_dequantized`, which
writes a plain transformers checkpoint (the FP model with those weights copied in) and peer_metrics.json
(tool, method, format, quantization time, peak RSS). `to_run.py import` turns that into a lowbit run folder.
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch


def peer_arguments() -> argparse.ArgumentParser:
    """The arguments every calibrated peer runner takes: model, lowbit's calibration windows, output, format."""
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    return p


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load_windows(path: str) -> torch.Tensor:
    """[n, seq_len] token ids, exactly the windows a lowbit run calibrates on."""
    return torch.load(path)


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder-block linears (what lowbit quantizes by default; embedding and head stay FP)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def save_dequantized(model_path: str, params: dict[str, torch.Tensor], out: str, metrics: dict) -> None:
    """The FP model with the peer's parameters copied in (`params`: state-dict name -> tensor; every block linear's
    dequantized weight, plus any norm or bias a smoothing method changed), saved with the tokenizer, and
    `metrics` as peer_metrics.json (its peak_rss_gb: the runner's, taken right after compressing, before this
    loads a second copy of the model; the peak so far if it has none). Names the FP model lacks (scales, zero points) are ignored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    missing = sorted(f"{n}.weight" for n in block_linears(model) if f"{n}.weight" not in params)
    if missing:
        raise SystemExit(f"peer left {len(missing)} block linears unquantized, e.g. {missing[0]}")
    own = model.state_dict()
    with torch.no_grad():
        for name, value in params.items():
            if name in own:
                own[name].copy_(value.to(torch.float32).reshape(own[name].shape))
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    metrics = {"peak_rss_gb": peak_rss_gb(), **metrics}
    (Path(out) / "peer_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))

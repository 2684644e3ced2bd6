"""HQQ (calibration-free half-quadratic quantization) on every block linear; runs in ~/.cache/lowbit-peers/hqq.

  ~/.cache/lowbit-peers/hqq/bin/python benchmarks/peers/hqq_run.py MODEL_DIR OUT_DIR [--bits 4 --group-size 64]
HQQ is asymmetric (a zero point per group) and needs no calibration windows.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import block_linears, peak_rss_gb, save_dequantized


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import hqq
    from hqq.core.quantize import Quantizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    start = time.perf_counter()
    params = {}
    for name, linear in block_linears(model).items():
        w_q, meta = Quantizer.quantize(linear.weight.data, nbits=a.bits, group_size=a.group_size, optimize=True,
                                       axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
        params[f"{name}.weight"] = Quantizer.dequantize(w_q, meta).reshape(linear.weight.shape)
    seconds, peak = time.perf_counter() - start, peak_rss_gb()  # before saving loads a second copy
    save_dequantized(a.model, params, a.out, {
        "tool": f"hqq {getattr(hqq, '__version__', '?')}", "method": "hqq", "bits": a.bits, "group_size": a.group_size,
        "symmetric": False, "quant_time_s": seconds, "peak_rss_gb": peak, "threads": a.threads, "calibration": "none"})


if __name__ == "__main__":
    main()

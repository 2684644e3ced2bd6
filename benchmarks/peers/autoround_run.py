"""Intel AutoRound (sign-gradient rounding and range tuning, library defaults: 200 iterations) with lowbit's
calibration windows; runs in ~/.cache/lowbit-peers/autoround (benchmarks/peers/venv.sh autoround auto-round).

  ~/.cache/lowbit-peers/autoround/bin/python benchmarks/peers/autoround_run.py MODEL_DIR CALIB.pt OUT_DIR [--iters 200]
AutoRound saves its fake-quantized weights (format "fake") to a scratch folder; those block linears are copied
into the FP checkpoint by common.save_dequantized.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import load_windows, peer_arguments, peak_rss_gb, save_dequantized


def main() -> None:
    p = peer_arguments()
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    import auto_round
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    ids = load_windows(a.calib)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=8)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer, scheme={"bits": a.bits, "group_size": a.group_size, "sym": a.sym, "data_type": "int"},
                   dataset=loader, iters=a.iters, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=8,
                   device_map="cpu", seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        ar.quantize_and_save(scratch, format="fake")
        seconds, peak = time.perf_counter() - start, peak_rss_gb()  # before saving loads a second copy
        params = {}
        for f in sorted(Path(scratch).rglob("*.safetensors")):
            params.update(load_file(str(f)))
    save_dequantized(a.model, params, a.out, {
        "tool": f"auto-round {auto_round.__version__}", "method": "autoround", "bits": a.bits,
        "group_size": a.group_size, "symmetric": a.sym, "quant_time_s": seconds, "peak_rss_gb": peak, "threads": a.threads,
        "iters": a.iters, "calibration": list(ids.shape)})


if __name__ == "__main__":
    main()

"""GPTQModel's GPTQ (library defaults otherwise) with lowbit's calibration windows; runs in ~/.cache/lowbit-peers/gptqmodel
(benchmarks/peers/venv.sh gptqmodel gptqmodel).

  ~/.cache/lowbit-peers/gptqmodel/bin/python benchmarks/peers/gptqmodel_run.py MODEL_DIR CALIB.pt OUT_DIR [--bits 4 --group-size 64 --sym]
The quantized model is saved in GPTQModel's checkpoint format and loaded back, as its users deploy it: right after
`quantize()` the packed layers hold zero points in the on-disk (v1, zero - 1) convention that its torch kernel only
converts when loading, so reading them in memory shifts every group by one step. The reloaded layers' own
dequantize_weight() gives the weights copied into the FP checkpoint by common.save_dequantized.
"""
from __future__ import annotations

import tempfile
import time

import torch

from common import load_windows, peer_arguments, peak_rss_gb, save_dequantized


def main() -> None:
    p = peer_arguments()
    a = p.parse_args()
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(a.threads)
    ids = load_windows(a.calib)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    model = GPTQModel.load(a.model, QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, offload_to_disk=False), device="cpu")
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    seconds, peak = time.perf_counter() - start, peak_rss_gb()  # before saving loads a second copy
    params = {}
    with tempfile.TemporaryDirectory() as saved, torch.no_grad():
        model.save(saved)
        del model
        model = GPTQModel.load(saved, device="cpu")
        for name, m in model.model.named_modules():
            if hasattr(m, "dequantize_weight") and ".layers." in name:
                w = m.dequantize_weight().float()
                w = w.t() if w.shape[0] == m.in_features else w
                x = torch.randn(4, m.in_features)
                y = m(x.to(w.dtype)).float()
                err = ((y - x @ w.t() - (m.bias if m.bias is not None else 0)).norm() / y.norm()).item()
                if err > 1e-2:  # the layer's own forward must agree with the weights we copy
                    raise SystemExit(f"{name}: dequantized weight does not reproduce the layer ({err:.3g})")
                params[f"{name}.weight"] = w
    save_dequantized(a.model, params, a.out, {
        "tool": f"gptqmodel {gptqmodel.__version__}", "method": "gptq", "bits": a.bits, "group_size": a.group_size,
        "symmetric": a.sym, "quant_time_s": seconds, "peak_rss_gb": peak, "threads": a.threads, "calibration": list(ids.shape)})


if __name__ == "__main__":
    main()

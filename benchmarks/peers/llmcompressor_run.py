"""llm-compressor's GPTQ, AWQ, SmoothQuant+GPTQ and data-free RTN (library defaults otherwise) with lowbit's
calibration windows;
runs in ~/.cache/lowbit-peers/llmcompressor (benchmarks/peers/venv.sh llmcompressor llmcompressor).

  ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py MODEL_DIR CALIB.pt OUT_DIR \
      --method gptq|awq|sq-gptq [--bits 4 --group-size 64 --sym] [--act-bits 8]
--group-size 0 quantizes per output channel; --act-bits 8 adds llm-compressor's dynamic per-token symmetric
activations (its W8A8 scheme with --bits 8 --group-size 0 --sym --method sq-gptq). --method rtn is its data-free
QuantizationModifier (CALIB.pt is not read: pass -). --dtype loads the model in that dtype (default float32);
--metrics-only writes peer_metrics.json alone (time and memory of models too large to save a float32 copy of).
The dequantized weights (compressed-tensors' own fake_quantize of the stored scales / zero points) and any norm
the smoothing methods changed are copied into the FP checkpoint by common.save_dequantized.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common import peer_arguments, block_linears, load_windows, peak_rss_gb, save_dequantized


def main() -> None:
    p = peer_arguments()
    p.add_argument("--method", choices=["gptq", "awq", "sq-gptq", "rtn"], required=True)
    p.add_argument("--act-bits", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--metrics-only", action="store_true")
    a = p.parse_args()
    import llmcompressor
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    if not torch.cuda.is_available():  # AWQ pins cached activations, which needs an accelerator; on CPU it is moot
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    ids = None if a.method == "rtn" else load_windows(a.calib)
    data = None if ids is None else Dataset.from_dict({"input_ids": ids.tolist(),
                                                       "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": a.bits, "type": "int", "symmetric": a.sym, "strategy": "group", "group_size": a.group_size}
    if not a.group_size:
        weights = {"num_bits": a.bits, "type": "int", "symmetric": a.sym, "strategy": "channel"}
    scheme = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if a.act_bits:
        scheme["group_0"]["input_activations"] = {"num_bits": a.act_bits, "type": "int", "symmetric": True,
                                                  "strategy": "token", "dynamic": True}
    quant = dict(config_groups=scheme, ignore=["lm_head"])
    recipe = {"gptq": [GPTQModifier(**quant)], "awq": [AWQModifier(**quant)],
              "sq-gptq": [SmoothQuantModifier(), GPTQModifier(**quant)], "rtn": [QuantizationModifier(**quant)]}[a.method]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    start = time.perf_counter()
    if ids is None:
        oneshot(model=model, recipe=recipe)
    else:
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0])
    seconds, peak = time.perf_counter() - start, peak_rss_gb()  # before saving loads a second copy
    metrics = {"tool": f"llmcompressor {llmcompressor.__version__}", "method": a.method, "bits": a.bits,
               "group_size": a.group_size, "symmetric": a.sym, "act_bits": a.act_bits, "quant_time_s": seconds,
               "peak_rss_gb": peak, "threads": a.threads, "dtype": a.dtype,
               "calibration": None if ids is None else list(ids.shape)}
    if a.metrics_only:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "peer_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
        return
    params = {k: v for k, v in model.state_dict().items() if "layers." in k and k.endswith(("weight", "bias"))}
    with torch.no_grad():
        for name, m in block_linears(model).items():
            g_idx = getattr(m, "weight_g_idx", None)
            if a.group_size and g_idx is not None and (g_idx != torch.arange(g_idx.numel()) // a.group_size).any():
                raise SystemExit(f"{name}: permuted groups (actorder='group') are not supported here")
            params[f"{name}.weight"] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point,
                                                     m.quantization_scheme.weights)
    save_dequantized(a.model, params, a.out, metrics)

if __name__ == "__main__":
    main()

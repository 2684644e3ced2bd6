"""Speed and memory of real low-bit kernels against FP32 on the same machine, in one process, as ratios.

`bench_speed` times whole models; `bench_layers` times single packed layers, which shows where each kernel
is fast (one input row, as in decoding, or many, as in prefill) and why weight-only kernels take bfloat16 inputs.

Every configuration is quantized in memory with round-to-nearest, converted with `to_real`, and timed in
interleaved rounds (after warm-up rounds) so that machine load drifts affect all of them alike; the median of
the repeats is reported. Prefill: one forward over the prompt (logits of the last position only). Decode:
greedy single-token steps with the KV cache.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, minmax_qparams
from lowbit.kernels.convert import memory_bytes, real_linear, to_real
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import Settings, compress
from lowbit.state import WeightRecord
from lowbit.steps import get_step

INT8_TOKEN = QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)
CONFIGS: dict[str, Settings | None] = {
    "fp32": None,
    "w8a16": Settings(weights=QuantSpec(bits=8, symmetric=True)),
    "w4a16": Settings(weights=QuantSpec(bits=4, symmetric=False, group_size=64)),
    "w8a8": Settings(weights=QuantSpec(bits=8, symmetric=True), activations=INT8_TOKEN),
}


def build(model_name: str, settings: Settings | None, calib_ids: torch.Tensor) -> tuple[nn.Module, str]:
    """The model quantized per `settings` with RTN and packed onto real kernels (FP32 if settings is None);
    weight-only kernels take bfloat16 inputs (their fast path), everything else stays float32."""
    model, _ = load_model(model_name)
    if settings is None:
        return model, "fp32 dense"
    state = compress(model, get_adapter(model), settings, [get_step("rtn")()], calib_ids, progress=False)
    to_real(model, state, torch.bfloat16)
    return model, ", ".join(sorted({f"{p.kernel} ({p.compute})" for p in model.lowbit_kernels}))


def share_unchanged(model: nn.Module, reference: nn.Module) -> None:
    """Point parameters equal to the same-named ones of `reference` (embeddings, norms) at the reference's tensors,
    so several variants of one model fit in memory together; each still counts them in its own size."""
    ref = dict(reference.named_parameters(remove_duplicate=False))
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        r = ref.get(name)
        if r is not None and r.shape == p.shape and torch.equal(r, p):
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, r)


@torch.inference_mode()
def time_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill of `prompt` [1, T] and for `new_tokens` greedy decode steps after it."""
    start = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(token, cache=out.cache, use_cache=True)
    return prefilled - start, time.perf_counter() - prefilled


def bench_speed(model_name: str = "smollm2-135m", configs: tuple[str, ...] = tuple(CONFIGS), prompt_len: int = 128,
                new_tokens: int = 32, repeats: int = 5, warmup: int = 1, threads: int = 1) -> list[dict]:
    """One row per configuration: kernels, memory and tokens/s of prefill and decode, each also as a ratio to
    the first configuration (FP32 by default)."""
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise LowbitError(f"unknown benchmark configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    if repeats < 1 or prompt_len < 1 or new_tokens < 1:
        raise LowbitError("repeats, prompt length and new tokens must be positive")
    torch.set_num_threads(threads)
    _, tokenizer = load_model(model_name)
    tokens = tokenize(tokenizer, load_text("wikitext2", "validation"))
    calib_ids = calibration_windows(tokens, 2, 64, seed=0)
    prompt = tokens[None, :prompt_len]
    models = {}
    for name in configs:
        models[name] = build(model_name, CONFIGS[name], calib_ids)
        share_unchanged(models[name][0], next(iter(models.values()))[0])
        gc.collect()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for round_ in range(warmup + repeats):
        for name, (model, _) in models.items():
            t = time_once(model, prompt, new_tokens)
            if round_ >= warmup:
                times[name].append(t)
    rows = []
    for name, (model, kernels) in models.items():
        prefill = prompt_len / statistics.median(t[0] for t in times[name])
        decode = new_tokens / statistics.median(t[1] for t in times[name])
        rows.append({"config": name, "kernels": kernels, "memory_mb": memory_bytes(model) / 1e6,
                     "prefill_tok_s": prefill, "decode_tok_s": decode})
    base = rows[0]
    for row in rows:
        for key in ("memory_mb", "prefill_tok_s", "decode_tok_s"):
            row[f"{key}_ratio"] = row[key] / base[key]
    return rows


def speed_table(rows: list[dict]) -> str:
    """Markdown table of `bench_speed` rows; ratios are relative to the first row."""
    ref = rows[0]["config"]
    lines = [f"| config | kernels | memory MB (x {ref}) | prefill tok/s (x {ref}) | decode tok/s (x {ref}) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kernels']} | {r['memory_mb']:.1f} ({r['memory_mb_ratio']:.2f}) | "
                     f"{r['prefill_tok_s']:.1f} ({r['prefill_tok_s_ratio']:.2f}) | "
                     f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_ratio']:.2f}) |")
    return "\n".join(lines)


LAYER_CONFIGS: dict[str, tuple[QuantSpec | None, QuantSpec | None, torch.dtype | None]] = {
    "fp32 nn.Linear": (None, None, None),
    "int8 weight-only, float32 inputs": (QuantSpec(bits=8, symmetric=True), None, torch.float32),
    "int8 weight-only, bfloat16 inputs": (QuantSpec(bits=8, symmetric=True), None, torch.bfloat16),
    "int4 g64 weight-only, float32 inputs": (QuantSpec(bits=4, symmetric=False, group_size=64), None, torch.float32),
    "int4 g64 weight-only, bfloat16 inputs": (QuantSpec(bits=4, symmetric=False, group_size=64), None, torch.bfloat16),
    "int8 x int8 (per-token dynamic)": (QuantSpec(bits=8, symmetric=True), INT8_TOKEN, None),
    "dequantize + matmul (int8 g64)": (QuantSpec(bits=8, symmetric=True, group_size=64), None, None),
}


@torch.inference_mode()
def bench_layers(out_features: int = 1536, in_features: int = 576, rows: tuple[int, ...] = (1, 128),
                 repeats: int = 20, threads: int = 1) -> list[dict]:
    """Milliseconds per call of each packed layer type on one random layer shape, for each number of input rows
    (1 = a decode step, 128 = a prefill chunk); the fastest of `repeats` calls after one warm-up call, the
    estimate least disturbed by other processes on a shared machine."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    results = []
    for name, (wspec, aspec, compute) in LAYER_CONFIGS.items():
        module = linear
        if wspec is not None:
            layer = nn.Linear(in_features, out_features, bias=False)
            scale, zero = minmax_qparams(linear.weight, wspec)
            layer.weight.data = fake_quant(linear.weight, scale, zero, wspec)
            act = ActQuantizer(aspec) if aspec is not None else None
            module, _ = real_linear(name, layer, WeightRecord(wspec, scale, zero), act, compute)
        row = {"layer": name}
        for m in rows:
            x = torch.randn(m, in_features)
            module(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)
            row[f"ms_{m}"] = min(times) * 1e3
        results.append(row)
    return results


def layers_table(rows: list[dict]) -> str:
    """Markdown table of `bench_layers`: ms per call and the ratio to the first (FP32) row."""
    counts = [k.removeprefix("ms_") for k in rows[0] if k.startswith("ms_")]
    lines = ["| layer | " + " | ".join(f"ms, {m} rows (x fp32)" for m in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for r in rows:
        cells = [f"{r['ms_' + m]:.3f} ({r['ms_' + m] / rows[0]['ms_' + m]:.2f})" for m in counts]
        lines.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Speed and memory of real low-bit kernels against FP32 on the same machine, in one process, as ratios.

`bench_speed` times whole models; `bench_layers` times single packed layers, which shows where each kernel
is fast (one input row, as in decoding, or many, as in prefill) and why weight-only kernels take bfloat16 inputs.

Every configuration is quantized in memory with round-to-nearest, converted with `to_real`, and timed in
rounds alternating with the FP32 model (after warm-up rounds) so that machine load drifts affect both alike;
medians of the repeats are reported. Prefill: one forward over the prompt (logits of the last position only). Decode:
greedy single-token steps with the KV cache.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.context import FormatPlan
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, fake_quant, minmax_qparams
from lowbit.kernels.convert import memory_bytes, real_linear, to_real
from lowbit.loading import load_model
from lowbit.models import get_adapter
from lowbit.pipeline import compress
from lowbit.state import WeightRecord
from lowbit.steps import get_step

INT8_TOKEN = QuantSpec(bits=8, symmetric=True, granularity="token", dynamic=True)
CONFIGS: dict[str, FormatPlan | None] = {
    "fp32": None,
    "w8a16": FormatPlan(weights=QuantSpec(bits=8, symmetric=True)),
    "w4a16": FormatPlan(weights=QuantSpec(bits=4, symmetric=False, group_size=64)),
    "w8a8": FormatPlan(weights=QuantSpec(bits=8, symmetric=True), activations=INT8_TOKEN),
}


def build(model_name: str, plan: FormatPlan | None, calib_ids: torch.Tensor) -> tuple[nn.Module, str]:
    """The model quantized per `plan` with RTN and packed onto real kernels (FP32 if plan is None);
    weight-only kernels take bfloat16 inputs (their fast path), everything else stays float32."""
    model, _ = load_model(model_name)
    if plan is None:
        return model, "fp32 dense"
    state = compress(model, get_adapter(model), plan, [get_step("rtn")()], calib_ids, progress=False)
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
    FP32. Quantized models are built one at a time and timed in rounds alternating with the FP32 model, so that
    each ratio compares runs made under the same machine load and only two models are in memory at once."""
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
    fp, _ = build(model_name, None, calib_ids)
    fp_times: list[tuple[float, float]] = []
    rows = []
    for name in [c for c in configs if c != "fp32"]:
        model, kernels = build(model_name, CONFIGS[name], calib_ids)
        share_unchanged(model, fp)
        gc.collect()
        pair: dict[str, list[tuple[float, float]]] = {"fp32": [], name: []}
        for round_ in range(warmup + repeats):
            for key, m in (("fp32", fp), (name, model)):
                t = time_once(m, prompt, new_tokens)
                if round_ >= warmup:
                    pair[key].append(t)
        fp_times += pair["fp32"]
        rows.append(_speed_row(name, kernels, memory_bytes(model), pair[name], pair["fp32"], prompt_len, new_tokens))
        del model
        gc.collect()
    fp_row = _speed_row("fp32", "fp32 dense", memory_bytes(fp), fp_times, fp_times, prompt_len, new_tokens)
    return [fp_row, *rows]


def _speed_row(name: str, kernels: str, memory: int, times: list[tuple[float, float]],
               fp_times: list[tuple[float, float]], prompt_len: int, new_tokens: int) -> dict:
    """Median tokens/s of prefill and decode, and ratios to the FP32 times measured alongside."""
    row = {"config": name, "kernels": kernels, "memory_mb": memory / 1e6}
    for key, count, i in (("prefill_tok_s", prompt_len, 0), ("decode_tok_s", new_tokens, 1)):
        row[key] = count / statistics.median(t[i] for t in times)
        row[f"{key}_ratio"] = statistics.median(t[i] for t in fp_times) / statistics.median(t[i] for t in times)
    return row


def speed_table(rows: list[dict]) -> str:
    """Markdown table of `bench_speed` rows (the first is FP32)."""
    fp_mb = rows[0]["memory_mb"]
    lines = ["| config | kernels | memory MB (x fp32) | prefill tok/s (x fp32) | decode tok/s (x fp32) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kernels']} | {r['memory_mb']:.1f} ({r['memory_mb'] / fp_mb:.2f}) | "
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

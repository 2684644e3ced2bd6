"""compressed-tensors export (the checkpoint format vLLM and SGLang load), built with the compressed-tensors package.

Each quantized linear gets a QuantizationScheme (pack-quantized W4A16/W8A16, int-quantized W8A8 with
per-token dynamic or static per-tensor activations, float-quantized FP8); its scale is rounded to the
export dtype first and the weight handed to the compressor is rebuilt from the run's codes on that
scale, so the compressor's own round(w / scale) + zero reproduces the run's codes exactly (checked).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import DTYPES, LoadedRun, register_exporter, run_codes, stored_scale
from lowbit.formats import QuantSpec, dequantize



def _args(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs fields for one of our formats (granularity names coincide)."""
    return {"num_bits": spec.bits, "type": "float" if spec.format == "fp" else "int",
            "symmetric": spec.symmetric, "strategy": spec.granularity,
            "group_size": spec.group_size if spec.granularity == "group" else None, "dynamic": spec.dynamic}


def build_config(run: LoadedRun):
    """QuantizationConfig with one config group per (scheme, weight format, activation format)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, scheme in run.schemes.items():
        if scheme is None:
            continue
        act = run.state.input_quantizers.get(name)
        key = (scheme.name, run.state.weights[name].spec, act.spec if act else None)
        groups.setdefault(key, []).append(name)
    linears = [n for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {n for names in groups.values() for n in names}
    ignore = [n for n in linears if n not in quantized]
    config_groups = {}
    for i, ((fmt, wspec, aspec), names) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**_args(wspec)),
            input_activations=QuantizationArgs(**_args(aspec)) if aspec else None, format=fmt)
    return QuantizationConfig(config_groups=config_groups, ignore=ignore, format=_summary_format(groups))


def _summary_format(groups: dict) -> str:
    formats = {fmt for fmt, _, _ in groups}
    return formats.pop() if len(formats) == 1 else "mixed-precision"


def _offset(spec: QuantSpec) -> int:
    """Our asymmetric codes are unsigned [0, 2^b - 1]; compressed-tensors stores signed [-2^(b-1), 2^(b-1) - 1]."""
    return 0 if spec.format == "fp" or spec.symmetric else 2 ** (spec.bits - 1)


@torch.no_grad()
def _load_codes(run: LoadedRun, name: str, module: torch.nn.Module) -> torch.Tensor:
    """Put the run's codes into a module compressed-tensors has initialized; returns the expected stored codes."""
    rec = run.state.weights[name]
    codes = run_codes(name, module.weight, rec)
    scale = stored_scale(rec.scale, DTYPES[run.dtype], name)
    zero = rec.zero.float() - _offset(rec.spec)
    signed = codes - _offset(rec.spec)
    module.weight.data = dequantize(signed, scale, zero, rec.spec)
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)
    act = run.state.input_quantizers.get(name)
    if act is not None and act.scale is not None:  # static activations (symmetric: the backend check ensures it)
        module.input_scale.data = stored_scale(act.scale.detach(), DTYPES[run.dtype], name).reshape(
            module.input_scale.shape).to(module.input_scale.dtype)
    return signed


def _stored_codes(module: torch.nn.Module, shape: torch.Size) -> torch.Tensor:
    """Codes as compressed-tensors stored them, unpacked again with its own helper."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scheme = module.quantization_scheme
    if hasattr(module, "weight_packed"):
        return unpack_from_int32(module.weight_packed, scheme.weights.num_bits, shape).float()
    return module.weight.float()


@register_exporter("compressed-tensors")
def write_compressed_tensors(run: LoadedRun, path: Path) -> list[str]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model = run.model
    config = build_config(run)
    apply_quantization_config(model, config, show_progress=False)
    expected = {}
    for name in run.schemes:
        if run.schemes[name] is not None:
            module = model.get_submodule(name)
            expected[name] = (_load_codes(run, name, module), module.weight.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    for name, (codes, shape) in expected.items():
        module = model.get_submodule(name)
        if not torch.equal(_stored_codes(module, shape), codes):
            raise LowbitError(f"compressed-tensors stored different codes for {name} than the run computed; "
                              f"this is a lowbit bug, please report it")
    model.to(DTYPES[run.dtype])
    model.config.use_cache = True
    model.save_pretrained(path)
    run.tokenizer.save_pretrained(path)
    compressor.update_config(str(path))
    return [f"format {config.format}: {len(expected)} quantized linears in {len(config.config_groups)} group(s), "
            f"{len(config.ignore)} kept in {run.dtype}; codes identical to the run's, scales stored in {run.dtype}"]


def load_compressed(path: Path) -> nn.Module:
    """Load an export with transformers (+ compressed-tensors), dequantized to float32 on the CPU.

    transformers cannot load asymmetric pack-quantized checkpoints with compressed-tensors 0.20 (its
    meta-device pass does not pack the zero point: vllm-project/llm-compressor#1618), so those are
    built from the config and decompressed with compressed-tensors itself.
    """
    from transformers import AutoModelForCausalLM

    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    if not any(g["weights"] and not g["weights"]["symmetric"] and g.get("format") == "pack-quantized"
               for g in qconfig["config_groups"].values()):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _load_with_compressed_tensors(path, qconfig)


def _load_with_compressed_tensors(path: Path, qconfig: dict) -> nn.Module:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    qc = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k in QuantizationConfig.model_fields})
    apply_quantization_config(model, qc, show_progress=False)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise LowbitError(f"{path} does not match its config (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {unexpected[:3]}): re-export it")
    compressor.decompress_model(model)
    model.tie_weights()
    return model.float()

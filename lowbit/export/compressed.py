"""compressed-tensors export (the checkpoint format vLLM and SGLang load), built with the compressed-tensors package.

Each quantized linear gets a QuantizationScheme (pack-quantized W4A16/W8A16, int-quantized W8A8 with
per-token dynamic or static per-tensor activations, float-quantized FP8 per channel / tensor or in 2-D blocks
with per-token-group activations, mxfp4-pack-quantized, nvfp4-pack-quantized, mxfp8-quantized); its scale is
rounded to the dtype the format stores (the export dtype, or exactly E8M0 / FP8 for block-scaled formats) and
the weight handed to the compressor is rebuilt from the run's codes on that scale, so the compressor's own
rounding reproduces the run's codes exactly (checked).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import DTYPES, LoadedRun, ct_version, register_exporter, stored_scale
from lowbit.formats import QuantSpec, dequantize



def _args(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs fields for one of our formats (as its presets MXFP4A16, NVFP4A16,
    MXFP8A16 and FP8_BLOCK spell them; other granularity names coincide)."""
    args = {"num_bits": spec.bits, "type": "float" if spec.format == "fp" else "int", "symmetric": spec.symmetric,
            "strategy": spec.granularity, "group_size": spec.group_size, "dynamic": spec.dynamic}
    if spec.granularity == "block":
        args["block_structure"] = list(spec.block)
    if spec.scale_format == "e8m0":
        args |= {"scale_dtype": torch.uint8, "zp_dtype": torch.uint8}
    if spec.scale_format == "e4m3":
        args |= {"strategy": "tensor_group", "scale_dtype": torch.float8_e4m3fn, "zp_dtype": torch.float8_e4m3fn}
    return args


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
    codes = rec.codes(module.weight, name)
    # block-scaled formats store their scales exactly (E8M0 powers of two, FP8 values under the tensor scale)
    scale = rec.scale.float() if rec.spec.scale_format else stored_scale(rec.scale, DTYPES[run.dtype], name)
    zero = rec.zero.float() - _offset(rec.spec)
    signed = codes - _offset(rec.spec)
    module.weight.data = dequantize(signed, scale, zero, rec.spec)
    if rec.global_scale is not None:  # compressed-tensors keeps the FP8 block scales and divides by the tensor scale
        module.weight_global_scale.data = rec.global_scale.reshape(module.weight_global_scale.shape)
        scale = scale * rec.global_scale
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)
    mask = run.state.masks.get(name)
    if mask is not None and module.weight.data[mask].any():
        raise LowbitError(f"{name}: pruned weights would not be exactly zero in the export (zero point off the grid); "
                          f"this is a lowbit bug, please report it")
    act = run.state.input_quantizers.get(name)
    if act is not None and act.scale is not None:  # static activations (symmetric: the backend check ensures it)
        module.input_scale.data = stored_scale(act.scale.detach(), DTYPES[run.dtype], name).reshape(
            module.input_scale.shape).to(module.input_scale.dtype)
    return signed


def _stored_codes(module: torch.nn.Module, shape: torch.Size) -> torch.Tensor:
    """Codes as compressed-tensors stored them, unpacked again with its own helpers."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scheme = module.quantization_scheme
    if hasattr(module, "weight_packed") and module.weight_packed.dtype == torch.uint8:  # fp4 nibbles
        return unpack_fp4_from_uint8(module.weight_packed, *shape, dtype=torch.float32)
    if hasattr(module, "weight_packed"):
        return unpack_from_int32(module.weight_packed, scheme.weights.num_bits, shape).float()
    return module.weight.float()


def _check_block_widths(run: LoadedRun) -> None:
    """vLLM's block-FP8 kernels need each weight's width to be a multiple of the block width (rows may be partial)."""
    for name, scheme in run.schemes.items():
        spec = run.state.weights[name].spec if scheme is not None else None
        if spec is not None and spec.granularity == "block":
            width = run.linear(name).in_features
            if width % spec.block[1]:
                raise LowbitError(f"cannot export to compressed-tensors: {name} is {width} wide, not a multiple of "
                                  f"the block width {spec.block[1]} (vLLM's block-FP8 kernels need that); use "
                                  f"weights.block [{spec.block[0]}, {_divisor(width)}]")


def _divisor(width: int) -> int:
    return next(b for b in (128, 64, 32, 16, 8, 4, 2, 1) if width % b == 0)


@register_exporter("compressed-tensors")
def write_compressed_tensors(run: LoadedRun, path: Path) -> list[str]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model = run.model
    embedding = next((n for n, s in run.schemes.items() if s is not None
                      and not isinstance(model.get_submodule(n), nn.Linear)), None)
    if embedding is not None:
        raise LowbitError(f"compressed-tensors stores quantized linear layers only, not the embedding {embedding}: "
                          f"rerun without an embedding format (a quantized head exports)")
    _check_block_widths(run)
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
    _cast_dense(model, DTYPES[run.dtype])
    model.config.use_cache = True
    model.save_pretrained(path)
    run.tokenizer.save_pretrained(path)
    compressor.update_config(str(path))
    block_scaled = any(run.state.weights[n].spec.scale_format for n in expected)
    scales = "block scales stored exactly (E8M0 / FP8)" if block_scaled else f"scales stored in {run.dtype}"
    notes = _write_sparsity_config(run, path) if run.state.masks else []
    return notes + [f"format {config.format}: {len(expected)} quantized linears in {len(config.config_groups)} group(s), "
            f"{len(config.ignore)} kept in {run.dtype}; codes identical to the run's, {scales}"]


def _cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's wider float tensors to `dtype`, leaving FP8 block scales and FP32 tensor scales exact."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and not name.endswith("global_scale"):
            t.data = t.data.to(dtype)


def _write_sparsity_config(run: LoadedRun, path: Path) -> list[str]:
    """Record the run's sparsity in config.json as compressed-tensors' dense sparsity config (zeros in place)."""
    from compressed_tensors.config import DenseSparsityConfig

    from lowbit.sparsity import detect_pattern

    masks = run.state.masks
    total = sum(m.numel() for m in masks.values())
    sparsity = sum(int(m.sum()) for m in masks.values()) / total
    unquantized = sorted(n for n in masks if run.schemes.get(n) is None)
    if unquantized:
        raise LowbitError(f"cannot export to compressed-tensors: {unquantized[0]} is pruned but not quantized; the "
                          f"export would store it densely without its sparsity; quantize every pruned layer")
    config = DenseSparsityConfig(global_sparsity=sparsity, sparsity_structure=detect_pattern(masks),
                                 targets=sorted(masks))
    file = path / "config.json"
    data = json.loads(file.read_text())
    data["quantization_config"]["sparsity_config"] = config.model_dump()
    file.write_text(json.dumps(data, indent=2))
    return [f"sparsity {config.sparsity_structure} {sparsity:.2%} over {len(masks)} linears, recorded as "
            f"sparsity_config (format dense: compressed-tensors {ct_version()} has no sparse compressor, the zeros "
            f"are stored in the quantized codes; checked exact)"]


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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
        if getattr(model, "ct_decompress_hook", None) is not None:  # decompress now rather than on first forward
            model.hf_quantizer.compressor.decompress_model(model)
        for p in model.parameters():  # microscaling decompressors return bfloat16 whatever dtype is asked for
            p.data = p.data.float()
        return model
    return _load_with_compressed_tensors(path, qconfig)


def _load_with_compressed_tensors(path: Path, qconfig: dict) -> nn.Module:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
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

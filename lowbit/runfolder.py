"""The run folder format: what `lowbit run` writes and what export, kernels, verify and eval read back.

A run folder holds recipe.yaml (the validated recipe), metrics.json, run.log, model/ (a transformers
checkpoint with fake-quantized weights), quant_state.json (formats, transforms) and quant_state.safetensors
(scales, zero points, static activation ranges).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.state import QuantState, WeightRecord


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_state(state: QuantState, directory: Path) -> None:
    """Write quant_state.json (formats, transforms) and quant_state.safetensors (parameters)."""
    tensors, meta = {}, {"weights": {}, "inputs": {}, "outputs": {}, "transforms": state.transforms}
    for name, rec in state.weights.items():
        meta["weights"][name] = _spec_dict(rec.spec)
        tensors[f"{name}.weight_scale"] = rec.scale.contiguous()
        tensors[f"{name}.weight_zero"] = rec.zero.contiguous()
    for kind, table in (("inputs", state.input_quantizers), ("outputs", state.output_quantizers)):
        for name, q in table.items():
            meta[kind][name] = {"spec": _spec_dict(q.spec), "observer": q.observer, "static": q.scale is not None,
                                "clip_ratio": q.clip_ratio}
            if q.scale is not None:
                tensors[f"{name}.{kind}_scale"] = q.scale.detach().contiguous()
                tensors[f"{name}.{kind}_zero"] = q.zero.contiguous()
    (directory / "quant_state.json").write_text(json.dumps(meta, indent=1))
    save_file(tensors, str(directory / "quant_state.safetensors"))


def load_state(directory: Path) -> QuantState:
    """The QuantState saved in `directory` by `save_state` (hooks not yet installed)."""
    meta = json.loads((directory / "quant_state.json").read_text())
    tensors = load_file(str(directory / "quant_state.safetensors"))
    state = QuantState(transforms=meta["transforms"])
    for name, spec in meta["weights"].items():
        state.weights[name] = WeightRecord(QuantSpec(**spec), tensors[f"{name}.weight_scale"],
                                           tensors[f"{name}.weight_zero"])
    for kind, table in (("inputs", state.input_quantizers), ("outputs", state.output_quantizers)):
        for name, info in meta[kind].items():
            q = ActQuantizer(QuantSpec(**info["spec"]), info["observer"], clip_ratio=info.get("clip_ratio", 1.0))
            if info["static"]:
                q.scale = nn.Parameter(tensors[f"{name}.{kind}_scale"], requires_grad=False)
                q.zero = tensors[f"{name}.{kind}_zero"]
            table[name] = q
    return state


def _spec_dict(spec: QuantSpec) -> dict:
    return {k: getattr(spec, k) for k in ("bits", "format", "symmetric", "granularity", "group_size", "dynamic",
                                           "fp_variant")}


def save_run(directory: Path, recipe_yaml: str, metrics: dict, model: nn.Module, tokenizer,
             state: QuantState) -> None:
    """Write a finished run's recipe, model, tokenizer, quantization state and metrics into `directory`."""
    (directory / "recipe.yaml").write_text(recipe_yaml)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    save_state(state, directory)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "quant_state.json").exists()


def check_run_folder(run_dir: Path) -> None:
    """Refuse a path that is not a run folder, saying what to give instead."""
    if not is_run_folder(run_dir):
        raise LowbitError(f"{run_dir} is not a lowbit run folder (no quant_state.json): give a folder written by "
                          f"'lowbit run' or 'lowbit quantize'")


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise LowbitError(f"{run_dir} has no metrics.json: give folders written by 'lowbit run' or 'lowbit quantize'")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, QuantState]:
    """A saved run's model with its activation quantizers and online transforms attached again."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir)
    model, tokenizer = load_model(str(run_dir / "model"), dtype)
    state = load_state(run_dir)
    state.install(model)
    return model, tokenizer, state

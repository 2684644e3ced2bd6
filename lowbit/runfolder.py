"""The run folder format: what `lowbit run` writes and what export, kernels, verify and eval read back.

A run folder holds recipe.yaml (the validated recipe), metrics.json, run.log, model/ (a transformers
checkpoint with fake-quantized weights), quant_state.json (formats, transforms), quant_state.safetensors
(scales, zero points, static activation ranges, sparsity masks) and manifest.json (the run id, and the size and sha256 of
every file, checked before a run is read back). Runs written before manifests existed load unchecked.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.files import check_manifest, read_manifest, write_atomic, write_manifest
from lowbit.formats import QuantSpec
from lowbit.loading import load_model
from lowbit.sparsity import check_model_masks
from lowbit.state import QuantState, WeightRecord


def save_state(state: QuantState, directory: Path) -> None:
    """The run folder's quantization state files (see `write_state`)."""
    write_state(state, directory)


def write_state(state: QuantState, directory: Path) -> None:
    """Write quant_state.json (formats, transforms) and quant_state.safetensors (parameters); block checkpoints
    use it too."""
    tensors, meta = {}, {"weights": {}, "inputs": {}, "outputs": {}, "transforms": state.transforms,
                         "masks": sorted(state.masks)}
    for name, rec in state.weights.items():
        meta["weights"][name] = rec.spec.to_dict()
        tensors[f"{name}.weight_scale"] = rec.scale.contiguous()
        if rec.global_scale is not None:
            tensors[f"{name}.weight_global_scale"] = rec.global_scale.reshape(1).contiguous()
        tensors[f"{name}.weight_zero"] = rec.zero.contiguous()
    for kind, table in (("inputs", state.input_quantizers), ("outputs", state.output_quantizers)):
        for name, q in table.items():
            meta[kind][name] = {"spec": q.spec.to_dict(), "observer": q.observer, "static": q.scale is not None,
                                "clip_ratio": q.clip_ratio}
            if q.scale is not None:
                tensors[f"{name}.{kind}_scale"] = q.scale.detach().contiguous()
                tensors[f"{name}.{kind}_zero"] = q.zero.contiguous()
    for name, mask in state.masks.items():
        tensors[f"{name}.weight_mask"] = mask.to(torch.uint8).contiguous()
    write_atomic(directory / "quant_state.json", json.dumps(meta, indent=1, sort_keys=True))  # order-free bytes
    write_atomic(directory / "quant_state.safetensors", lambda path: save_file(tensors, str(path)))


def load_state(directory: Path) -> QuantState:
    """The QuantState saved in `directory` by `save_state` (hooks not yet installed)."""
    try:
        return _read_state(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, LowbitError) as exc:
        raise LowbitError(f"the quantization state in {directory} (quant_state.json, quant_state.safetensors) is "
                          f"damaged: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                          f"rerun the recipe") from None


def _read_state(directory: Path) -> QuantState:
    meta = json.loads((directory / "quant_state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(directory / "quant_state.safetensors"))
    state = QuantState(transforms=dict(meta["transforms"]))
    for name, spec in meta["weights"].items():
        state.weights[name] = WeightRecord(QuantSpec.from_dict(spec), tensors[f"{name}.weight_scale"],
                                           tensors[f"{name}.weight_zero"], tensors.get(f"{name}.weight_global_scale"))
    for kind, table in (("inputs", state.input_quantizers), ("outputs", state.output_quantizers)):
        for name, info in meta[kind].items():
            q = ActQuantizer(QuantSpec.from_dict(info["spec"]), info["observer"], clip_ratio=info.get("clip_ratio", 1.0))
            if info["static"]:
                q.scale = nn.Parameter(tensors[f"{name}.{kind}_scale"], requires_grad=False)
                q.zero = tensors[f"{name}.{kind}_zero"]
            table[name] = q
    for name in meta.get("masks", []):
        state.masks[name] = tensors[f"{name}.weight_mask"].bool()
    return state


def new_run_id() -> str:
    """A run's identity: its start time and a random suffix, unique across concurrent runs."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def save_run(directory: Path, recipe_yaml: str, metrics: dict, model: nn.Module, tokenizer,
             state: QuantState, model_written: bool = False) -> None:
    """Write a finished run's files into `directory` (a staging folder); `seal_run` adds the manifest last.

    `model_written`: the weights are already in model/ (streamed block by block); only the config is added."""
    write_atomic(directory / "recipe.yaml", recipe_yaml)
    if model_written:
        model.config.save_pretrained(directory / "model")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(directory / "model")
    else:
        model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    save_state(state, directory)
    write_atomic(directory / "metrics.json", json.dumps(metrics, indent=2))


def seal_run(directory: Path, run_id: str) -> None:
    """Record the run id and every file's size and sha256 (run.log included, so its writer must be closed)."""
    write_manifest(directory, {"run_id": run_id})


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "quant_state.json").exists()


def check_run_folder(run_dir: Path) -> dict | None:
    """Refuse a path that is not a run folder or whose files differ from its manifest; returns the manifest."""
    if not is_run_folder(run_dir):
        raise LowbitError(f"{run_dir} is not a lowbit run folder (no quant_state.json): give a folder written by "
                          f"'lowbit run' or 'lowbit quantize'")
    return check_manifest(Path(run_dir), "run folder", "rerun the recipe to write it again")


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise LowbitError(f"{run_dir} has no metrics.json: give folders written by 'lowbit run' or 'lowbit quantize'")
    check_manifest(Path(run_dir), "run folder", "rerun the recipe to write it again", only=("metrics.json",))
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{path} is damaged ({exc}): rerun the recipe to write it again") from None
    if not isinstance(metrics, dict):
        raise LowbitError(f"{path} is damaged (not a JSON object): rerun the recipe to write it again")
    return metrics


def update_metrics(run_dir: Path, metrics: dict) -> None:
    """Rewrite a run's metrics.json (e.g. with task scores added later) and its entry in the manifest."""
    from lowbit.files import MANIFEST, file_sha256

    path = Path(run_dir) / "metrics.json"
    write_atomic(path, json.dumps(metrics, indent=2))
    manifest = read_manifest(Path(run_dir))
    if manifest is not None:
        manifest["files"]["metrics.json"] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        write_atomic(Path(run_dir) / MANIFEST, json.dumps(manifest, indent=1))


def provenance(run_dir: Path) -> dict:
    """What identifies a run's quantization: its run id and the sha256 of its two quant_state files."""
    manifest = read_manifest(Path(run_dir)) or {}
    h = hashlib.sha256()
    for name in ("quant_state.json", "quant_state.safetensors"):
        h.update((Path(run_dir) / name).read_bytes())
    return {"run_id": manifest.get("run_id"), "quant_state_sha256": h.hexdigest()}


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, QuantState]:
    """A saved run's model with its activation quantizers and online transforms attached again."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir)
    model, tokenizer = load_model(str(run_dir / "model"), dtype)
    state = load_state(run_dir)
    check_model_masks(model, state, f"loading {run_dir}")
    state.install(model)
    return model, tokenizer, state

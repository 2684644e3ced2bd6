"""What compression adds to a model beyond its (fake-quantized) weights, and how it is saved and re-attached.

Weights are stored dequantized in the model itself, so the model saves as a plain transformers checkpoint;
`QuantState` keeps each quantized linear's format and parameters (needed for export and packing), the
activation quantizers, and online input transforms (e.g. a Hadamard transform before a down projection),
attached through one forward pre-hook per module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.formats import QuantSpec

# name -> factory(config, module) -> function applied to the module's input; steps register theirs
INPUT_TRANSFORMS: dict[str, Callable[[dict, nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {}


def register_input_transform(kind: str):
    """Decorator registering an online input transform factory under `kind`."""
    def wrap(factory):
        INPUT_TRANSFORMS[kind] = factory
        return factory
    return wrap


@dataclass
class WeightRecord:
    """Format and parameters a linear's weight was quantized with; codes = round(w / scale) + zero."""

    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass
class QuantState:
    weights: dict[str, WeightRecord] = field(default_factory=dict)
    inputs: dict[str, ActQuantizer] = field(default_factory=dict)
    outputs: dict[str, ActQuantizer] = field(default_factory=dict)
    transforms: dict[str, dict] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def install(self, model: nn.Module, prefix: str = "") -> None:
        """(Re)attach hooks for every module under `prefix` that has a transform or quantizer."""
        self.uninstall(prefix)
        names = {n for n in (*self.inputs, *self.outputs, *self.transforms) if n.startswith(prefix)}
        for name in sorted(names):
            module = model.get_submodule(name)
            transform = self._transform_fn(name, module)
            quant = self.inputs.get(name)
            if transform or quant:
                self._handles.append((name, module.register_forward_pre_hook(_input_hook(transform, quant))))
            if name in self.outputs:
                self._handles.append((name, module.register_forward_hook(_output_hook(self.outputs[name]))))

    def uninstall(self, prefix: str = "") -> None:
        keep = []
        for name, handle in self._handles:
            if name.startswith(prefix):
                handle.remove()
            else:
                keep.append((name, handle))
        self._handles = keep

    def _transform_fn(self, name: str, module: nn.Module):
        cfg = self.transforms.get(name)
        return INPUT_TRANSFORMS[cfg["kind"]](cfg, module) if cfg else None

    def quantizers(self, prefix: str = "") -> list[ActQuantizer]:
        return [q for n, q in (*self.inputs.items(), *self.outputs.items()) if n.startswith(prefix)]

    def save(self, directory: Path) -> None:
        """Write quant_state.json (formats, transforms) and quant_state.safetensors (parameters)."""
        tensors, meta = {}, {"weights": {}, "inputs": {}, "outputs": {}, "transforms": self.transforms}
        for name, rec in self.weights.items():
            meta["weights"][name] = _spec_dict(rec.spec)
            tensors[f"{name}.weight_scale"] = rec.scale.contiguous()
            tensors[f"{name}.weight_zero"] = rec.zero.contiguous()
        for kind, table in (("inputs", self.inputs), ("outputs", self.outputs)):
            for name, q in table.items():
                meta[kind][name] = {"spec": _spec_dict(q.spec), "observer": q.observer, "static": q.scale is not None,
                                    "clip_ratio": q.clip_ratio}
                if q.scale is not None:
                    tensors[f"{name}.{kind}_scale"] = q.scale.detach().contiguous()
                    tensors[f"{name}.{kind}_zero"] = q.zero.contiguous()
        (directory / "quant_state.json").write_text(json.dumps(meta, indent=1))
        save_file(tensors, str(directory / "quant_state.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> "QuantState":
        meta = json.loads((directory / "quant_state.json").read_text())
        tensors = load_file(str(directory / "quant_state.safetensors"))
        state = cls(transforms=meta["transforms"])
        for name, spec in meta["weights"].items():
            state.weights[name] = WeightRecord(QuantSpec(**spec), tensors[f"{name}.weight_scale"],
                                               tensors[f"{name}.weight_zero"])
        for kind in ("inputs", "outputs"):
            for name, info in meta[kind].items():
                q = ActQuantizer(QuantSpec(**info["spec"]), info["observer"], clip_ratio=info.get("clip_ratio", 1.0))
                if info["static"]:
                    q.scale = nn.Parameter(tensors[f"{name}.{kind}_scale"], requires_grad=False)
                    q.zero = tensors[f"{name}.{kind}_zero"]
                getattr(state, kind)[name] = q
        return state


def _spec_dict(spec: QuantSpec) -> dict:
    return {k: getattr(spec, k) for k in ("bits", "format", "symmetric", "granularity", "group_size", "dynamic",
                                           "fp_variant", "gguf")}


def _input_hook(transform, quant):
    def hook(_module, args):
        x = args[0]
        if transform is not None:
            x = transform(x)
        if quant is not None:
            x = quant(x)
        return (x, *args[1:])
    return hook


def _output_hook(quant):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (quant(output[0]), *output[1:])
        return quant(output)
    return hook

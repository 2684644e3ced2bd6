"""What compression adds to a model beyond its (fake-quantized) weights, and how it is re-attached.

Weights are stored dequantized in the model itself, so the model saves as a plain transformers checkpoint;
`QuantState` keeps each quantized linear's format and parameters (needed for export and packing), the
activation quantizers, sparsity masks, and online input transforms (e.g. a Hadamard transform before a down projection),
attached through one forward pre-hook per module. `lowbit.runfolder` saves and loads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowbit.actquant import ActQuantizer
from lowbit.formats import QuantSpec, recover_codes

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
    """Format and parameters a linear's weight was quantized with; codes = round(w / scale) + zero.

    `scale` is the effective float32 scale; NVFP4 also records its per-tensor `global_scale` (stored block
    scales are scale * global_scale, exactly e4m3 values).
    """

    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor
    global_scale: torch.Tensor | None = None

    def codes(self, weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
        """The codes of this record's dequantized `weight` (see `formats.recover_codes`)."""
        return recover_codes(weight, self.scale, self.zero, self.spec, name)


@dataclass
class QuantState:
    """Per module name: weight records, input and output activation quantizers, online input transforms."""

    weights: dict[str, WeightRecord] = field(default_factory=dict)
    input_quantizers: dict[str, ActQuantizer] = field(default_factory=dict)
    output_quantizers: dict[str, ActQuantizer] = field(default_factory=dict)
    transforms: dict[str, dict] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned weights (True = exactly zero), by linear
    _handles: list = field(default_factory=list)

    def install(self, model: nn.Module, prefix: str = "") -> None:
        """(Re)attach hooks for every module under `prefix` that has a transform or quantizer."""
        self.uninstall(prefix)
        names = {n for n in (*self.input_quantizers, *self.output_quantizers, *self.transforms) if n.startswith(prefix)}
        for name in sorted(names):
            module = model.get_submodule(name)
            transform = self._transform_fn(name, module)
            quant = self.input_quantizers.get(name)
            if transform or quant:
                self._handles.append((name, module.register_forward_pre_hook(_input_hook(transform, quant))))
            if name in self.output_quantizers:
                self._handles.append((name, module.register_forward_hook(_output_hook(self.output_quantizers[name]))))

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

    def select(self, keep: Callable[[str], bool]) -> "QuantState":
        """The entries whose module names `keep` accepts (sharing their tensors; no hooks)."""
        return QuantState({n: r for n, r in self.weights.items() if keep(n)},
                          {n: q for n, q in self.input_quantizers.items() if keep(n)},
                          {n: q for n, q in self.output_quantizers.items() if keep(n)},
                          {n: t for n, t in self.transforms.items() if keep(n)},
                          {n: m for n, m in self.masks.items() if keep(n)})

    def update(self, other: "QuantState") -> None:
        """Add (or replace) every entry of `other` (hooks are not touched: call `install`)."""
        for table in ("weights", "input_quantizers", "output_quantizers", "transforms", "masks"):
            getattr(self, table).update(getattr(other, table))

    def spill(self, prefix: str, path: Path) -> None:
        """Move the weight records' and masks' tensors of the modules under `prefix` to the file `path` and map
        them back from it: a streamed run keeps the finished blocks' state on disk (read only when the run is
        saved), so its memory does not grow with the depth of the model. Values are unchanged."""
        records = {n: r for n, r in self.weights.items() if n.startswith(prefix)}
        masks = {n: m for n, m in self.masks.items() if n.startswith(prefix)}
        tensors = {f"{n}.mask": m.cpu() for n, m in masks.items()}
        for n, r in records.items():
            tensors |= {f"{n}.scale": r.scale.cpu(), f"{n}.zero": r.zero.cpu()}
            if r.global_scale is not None:
                tensors[f"{n}.global_scale"] = r.global_scale.cpu()
        if not tensors:
            return
        with open(path, "wb") as f:  # (a failed write raises OSError, as the caller expects, not RuntimeError)
            torch.save(tensors, f)
        mapped = torch.load(path, mmap=True, weights_only=True)
        for n, r in records.items():
            r.scale, r.zero = mapped[f"{n}.scale"], mapped[f"{n}.zero"]
            r.global_scale = mapped.get(f"{n}.global_scale")
        self.masks |= {n: mapped[f"{n}.mask"] for n in masks}

    def quantizers(self, prefix: str = "") -> list[ActQuantizer]:
        return [q for n, q in (*self.input_quantizers.items(), *self.output_quantizers.items()) if n.startswith(prefix)]


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

"""Activation quantizers attached to the inputs of linear layers through forward pre-hooks.

Hooks keep the model's modules and state-dict names untouched, so a simulated-quantization model still
saves and loads as a plain transformers checkpoint; the quantizers themselves live in `QuantState`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit import distributed
from lowbit.formats import QuantSpec, fake_quant, minmax_qparams, qparams_from_range
from lowbit.observers import Observer, observe


class ActQuantizer(nn.Module):
    """Fake-quantizes a tensor: dynamically (parameters from each input) or statically (calibrated).

    Static quantizers calibrate by observing inputs while `calibrating` is set: min-max ranges are
    accumulated per channel over tokens, or samples are kept for the MSE / percentile observers.
    Dynamic quantizers shrink each token's min-max range by `clip_ratio` (QuaRot clips 4-bit activations at 0.9).
    `scale` is a parameter so learned step-size methods (LSQ) can train it.
    """

    def __init__(self, spec: QuantSpec, observer: Observer = "minmax", max_samples: int = 65536,
                 clip_ratio: float = 1.0):
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.clip_ratio = clip_ratio
        self.max_samples = max_samples
        self.enabled = True
        self.calibrating = False
        self.scale: nn.Parameter | None = None
        self.register_buffer("zero", None)
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if self.spec.dynamic or self.scale is None:
            scale, zero = minmax_qparams(x, self.spec, self.clip_ratio)
            return fake_quant(x, scale, zero, self.spec)
        return fake_quant(x, self.scale.to(x.dtype), self.zero.to(x.dtype), self.spec)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if self.observer == "minmax":
            lo, hi = flat.amin(), flat.amax()
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
            self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        else:
            self._samples.append(flat.reshape(-1)[torch.randperm(flat.numel())[: self.max_samples]])

    def finish_calibration(self) -> None:
        """Freeze static parameters from what was observed (per-tensor range for static activations)."""
        self.calibrating = False
        if self.observer == "minmax":
            if distributed.active():  # every rank's range, even one that saw no window
                inf = torch.tensor(float("inf"))
                self._lo = distributed.reduce(inf if self._lo is None else self._lo, "min")
                self._hi = distributed.reduce(-inf if self._hi is None else self._hi, "max")
            if self._lo is None:
                return
            self.set_range(self._lo, self._hi)
        else:
            if not self._samples:
                return
            scale, zero = observe(torch.cat(self._samples), self._static_spec(), self.observer)
            self._set_params(scale, zero)
        self._lo = self._hi = None
        self._samples = []

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Make the quantizer static with the per-tensor range [lo, hi]."""
        self._set_params(*qparams_from_range(lo.reshape(1).float(), hi.reshape(1).float(), self._static_spec()))

    def _static_spec(self) -> QuantSpec:
        return self.spec.with_(granularity="tensor", group_size=None)

    def _set_params(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scale = nn.Parameter(scale.reshape(1), requires_grad=False)
        self.zero = zero.reshape(1)

    def extra_repr(self) -> str:
        clip = f", clip_ratio={self.clip_ratio}" if self.clip_ratio != 1 else ""
        return f"{self.spec.describe()}, observer={self.observer}{clip}, static={self.scale is not None}"


def attach_input_hook(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    """Apply `fn` to the first positional input of `module` on every call."""
    def hook(_mod, args):
        return (fn(args[0]), *args[1:])
    return module.register_forward_pre_hook(hook)

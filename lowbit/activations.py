"""Where a block's calibration activations live: on the run's device, in host memory, or memory-mapped on disk.

A large model with many calibration windows has activations (windows x tokens x hidden, several copies) that
may not fit on the device, or not even in host memory. `ActivationStore` allocates every activation tensor of a
run in one place; the pipeline moves one batch at a time to the device when a block runs on it. Disk stores are
files mapped into memory and unlinked at once, so the kernel pages them in and out and nothing is left behind,
even after `kill -9`.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

OFFLOAD = ("auto", "none", "cpu", "disk")  # recipe values: auto = from the memory budget, none = on the device


@dataclass(frozen=True)
class ActivationStore:
    """Allocates activation tensors on `device`, in host memory (`cpu`) or on disk; computation stays on `device`."""

    place: str = "device"  # device | cpu | disk
    device: torch.device = torch.device("cpu")
    directory: Path | None = None  # disk: where the mapped files are created (default: the system temp folder)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised (disk: zero-filled) tensor in this store."""
        if self.place == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.place == "cpu":
            return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        fd, name = tempfile.mkstemp(prefix="lowbit-acts-", suffix=".bin", dir=self.directory)
        os.close(fd)
        try:
            size = math.prod(shape)
            flat = torch.from_file(name, shared=True, size=size, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        finally:
            os.unlink(name)  # the mapping keeps the space until the tensor is freed
        return flat.view(shape)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in this store (the same tensor when it already lives there)."""
        if self.place == "device":
            return x.to(self.device)
        if self.place == "cpu" and x.device.type == "cpu":
            return x
        out = self.empty(tuple(x.shape), x.dtype)
        out.copy_(x)
        return out

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of stored activations where the block computes."""
        return x.to(self.device, non_blocking=True)


def choose_place(offload: str, device: torch.device, activation_bytes: int, device_free: float,
                 host_free: float) -> str:
    """Where activations go: forced by `offload`, or (auto) the device if they fit in what its budget leaves,
    else host memory if that leaves room (a GPU run), else disk."""
    if offload == "none":
        return "device"
    if offload in ("cpu", "disk"):
        return offload
    if activation_bytes <= device_free:
        return "device"
    if device.type != "cpu" and activation_bytes <= host_free:
        return "cpu"
    return "disk"

"""Plan a run before running it: peak memory per device, disk space and time, against a memory budget.

Memory and disk come from the checkpoint's shard headers and config (nothing is loaded); time comes from a
short timed probe: the recipe's steps on the first block with a few calibration windows, scaled to all
blocks and windows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from lowbit.errors import LowbitError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size like `4GB`, `512MiB` or `1e9`."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise LowbitError(f"memory size {text!r} is not understood: write e.g. 4GB, 512MiB or 8e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_memory(spec: str | None) -> dict[str, int]:
    """`4GB` (every device) or `cpu=8GB,cuda:0=20GB` -> bytes per device name (`*` for every device)."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        device, sep, size = part.rpartition("=")
        out[device.strip() if sep else "*"] = parse_size(size)
    return out


def available(device: torch.device) -> int:
    """Memory free on a device now: the GPU's free memory, else the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def memory_budget(spec: str | None, device: torch.device) -> int:
    """The budget for `device` from `--max-memory` (its own entry, else the `*` one), else what is free."""
    budgets = parse_memory(spec)
    for key in (str(device), device.type, "*"):
        if key in budgets:
            return budgets[key]
    return available(device)

"""Device and dtype choices of a run, resolved before anything loads so that a wrong one fails at once."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


def resolve_device(name: str) -> torch.device:
    """`auto` = the first GPU if there is one (CUDA, then Apple MPS), else the CPU; others are checked."""
    if not re.match(DEVICE_PATTERN, name):
        raise LowbitError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise LowbitError(f"device {name} requested but no CUDA GPU is available (torch {torch.__version__}, "
                              f"{build}): use device: cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise LowbitError(f"device {name} requested but this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise LowbitError("device mps requested but Apple MPS is not available here: use device: cpu or auto")
    return torch.device(name)


def checkpoint_dtype(model_path: str) -> torch.dtype:
    """The dtype a local checkpoint declares in its config (float32 when it declares none we know)."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        text = data.get("text_config", {}) if isinstance(data.get("text_config"), dict) else {}
        name = data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        if name in DTYPES:
            return DTYPES[name]
    return torch.float32


def resolve_dtype(name: str, model_path: str) -> torch.dtype:
    """`auto` = the checkpoint's own dtype; otherwise the named one."""
    return checkpoint_dtype(model_path) if name == "auto" else DTYPES[name]

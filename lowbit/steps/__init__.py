"""Compression algorithms, one module each; importing this package registers every step it contains."""
import importlib
import pkgutil

from lowbit.steps.base import STEPS, Step, StepArgs, build_step, get_step, register_step

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["STEPS", "Step", "StepArgs", "build_step", "get_step", "register_step"]

"""Model adapters, one module per architecture family; importing this package registers them all."""
import importlib
import pkgutil

from lowbit.models.base import Adapter, LinearPair, NormGroup
from lowbit.models.registry import adapter_for_type, get_adapter, register_adapter

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Adapter", "LinearPair", "NormGroup", "adapter_for_type", "get_adapter", "register_adapter"]

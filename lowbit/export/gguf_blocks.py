"""Byte layouts of llama.cpp's block types: a run's codes, scales and zeros packed as ggml stores them.

The layouts are the inverses of the reference dequantizers in the gguf package (gguf.quants); `pack`
checks every tensor against that dequantizer, so a layout mistake fails the export instead of shipping.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.gguf_types import SUPER_BLOCK, GGUFType, split_params


def _f16(x: torch.Tensor) -> np.ndarray:
    """[n, 1] fp16 bytes [n, 2]."""
    return x.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[n, 2, m] values < 16 -> [n, m] bytes: first half in the low nibbles, second half in the high ones."""
    return (u[:, 0] & 15) | ((u[:, 1] & 15) << 4)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """[n, k, m] bits -> [n, m] bytes with plane i in bit i."""
    return sum(bits[:, i].astype(np.uint8) << i for i in range(bits.shape[1])).astype(np.uint8)


def _crumbs(u: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> [n, 64]: per 128 values, 32 bytes holding four 32-value runs at bit 0, 2, 4, 6."""
    u = u.reshape(-1, 2, 4, 32)
    return sum(u[:, :, s] << (2 * s) for s in range(4)).astype(np.uint8).reshape(-1, 64)


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes for eight 6-bit scales and mins: low 6 bits of the first four, the rest split."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return np.concatenate([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6),
                           (hi_sc & 15) | ((hi_mn & 15) << 4)], axis=1).astype(np.uint8)


def _scales_q3(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes for sixteen 6-bit scales: low nibbles in bytes 0-7, top two bits in bytes 8-11."""
    low = _nibbles(s.reshape(-1, 2, 8))
    high = sum(((s[:, 4 * k:4 * k + 4] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate([low, high], axis=1)


def _legacy(u: np.ndarray, gtype: GGUFType, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """Q4_0, Q5_0, Q8_0, Q4_1, Q5_1: per block of 32, fp16 d (and fp16 min), then the codes."""
    head = [_f16(scale)]
    if not gtype.symmetric:
        head.append(_f16(-zero * scale))
    if gtype.bits == 8:
        return np.concatenate([*head, u.astype(np.int8).view(np.uint8)], axis=1)
    body = [_nibbles(u.reshape(-1, 2, 16))]
    if gtype.bits == 5:
        body.insert(0, np.packbits((u >> 4) & 1, axis=-1, bitorder="little"))
    return np.concatenate([*head, *body], axis=1)


def _kquant(u: np.ndarray, gtype: GGUFType, scale: torch.Tensor, zero: torch.Tensor, name: str) -> np.ndarray:
    """Q2_K ... Q6_K: one super-block of 256 values per row of the result."""
    p = split_params(scale, zero, gtype, name)
    d, dmin = _f16(p.d), _f16(p.dmin)
    sc = p.sc.reshape(len(u), -1).numpy().astype(np.int16)
    mn = p.mn.reshape(len(u), -1).numpy().astype(np.uint8)
    if gtype.name == "Q2_K":
        return np.concatenate([(sc | (mn << 4)).astype(np.uint8), _crumbs(u), d, dmin], axis=1)
    if gtype.name == "Q3_K":
        hmask = _bit_planes((u >> 2).reshape(-1, 8, 32) & 1)
        return np.concatenate([hmask, _crumbs(u & 3), _scales_q3((sc + 32).astype(np.uint8)), d], axis=1)
    if gtype.name in ("Q4_K", "Q5_K"):
        parts = [d, dmin, _scales_k4(sc.astype(np.uint8), mn)]
        if gtype.name == "Q5_K":
            parts.append(_bit_planes((u >> 4).reshape(-1, 8, 32) & 1))
        return np.concatenate([*parts, _nibbles(u.reshape(-1, 4, 2, 32).reshape(-1, 2, 32)).reshape(len(u), -1)],
                              axis=1)
    if gtype.name == "Q6_K":
        ql = _nibbles(u.reshape(-1, 2, 2, 64).reshape(-1, 2, 64)).reshape(len(u), -1)
        qh = sum(((u.reshape(-1, 2, 4, 32)[:, :, s] >> 4) & 3) << (2 * s) for s in range(4)).astype(np.uint8)
        return np.concatenate([ql, qh.reshape(len(u), -1), sc.astype(np.int8).view(np.uint8), d], axis=1)
    raise AssertionError(gtype.name)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gtype: GGUFType, name: str) -> np.ndarray:
    """GGUF bytes [rows, row bytes] of a weight from its codes [rows, cols] and per-block scale/zero [rows, cols/block].

    Refuses (one line) if the packed tensor does not dequantize, in the gguf package's reference code, to
    (codes - zero) * scale: the export then carries exactly the run's weights.
    """
    import gguf

    rows, cols = codes.shape
    signed_store = gtype.bits == 8  # Q8_0 stores int8; other symmetric types store q + 2^(bits-1)
    offset = 2 ** (gtype.bits - 1) if gtype.symmetric and not signed_store else 0
    u = (codes.to(torch.int32) + offset).numpy()
    u = u if signed_store else u.astype(np.uint8)
    if gtype.scale_bits:
        blocks = _kquant(u.reshape(-1, SUPER_BLOCK), gtype, scale.reshape(-1, SUPER_BLOCK // gtype.block),
                         zero.reshape(-1, SUPER_BLOCK // gtype.block), name)
    else:
        blocks = _legacy(u.reshape(-1, gtype.block), gtype, scale.reshape(-1, 1), zero.reshape(-1, 1))
    data = blocks.reshape(rows, -1)
    qtype = gguf.GGMLQuantizationType[gtype.name]
    expect = ((codes.float().reshape(-1, gtype.block) - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(rows, cols)
    step = scale.float().repeat_interleave(gtype.block, dim=-1).reshape(rows, cols)
    got = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
    if not ((got - expect).abs() <= 1e-3 * step + 1e-7).all():
        raise LowbitError(f"{name}: the {gtype.name} blocks do not dequantize to the run's weights; the export is "
                          f"refused (report this as a bug with the run folder)")
    return data

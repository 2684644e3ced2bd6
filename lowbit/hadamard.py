"""Hadamard matrices and the fast Walsh-Hadamard transform, for orthogonal rotations of activations.

A size n = 2^k * m is handled as the Kronecker product H_{2^k} (Sylvester, applied by the fast butterfly)
with a dense H_m of a known order m: a Paley construction (order q+1 for a prime q = 3 mod 4, e.g. 12, 20,
72) or a Kronecker product of such orders (e.g. 144 = 12 * 12). Sizes with no known factor fall back to a
seeded random orthogonal matrix applied as a dense matmul (`orthogonal_matrix`, `transform`).
Everything is normalized: the matrices are orthogonal.
"""
from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import LowbitError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(q: int) -> torch.Tensor:
    """Unnormalized Hadamard matrix of order q+1 by Paley's first construction (prime q = 3 mod 4)."""
    if not _is_prime(q) or q % 4 != 3:
        raise LowbitError(f"Paley's construction needs a prime q = 3 mod 4, got {q}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric for q = 3 mod 4
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _known_order(m: int) -> torch.Tensor | None:
    """Unnormalized Hadamard matrix of order m from Paley and Kronecker products, or None if none is known here."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley_hadamard(m - 1)
    for a in range(2, math.isqrt(m) + 1):
        if m % a == 0:
            ha, hb = _known_order(a), _known_order(m // a)
            if ha is not None and hb is not None:
                return torch.kron(ha, hb)
    return None


def factorize(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k * m and a known Hadamard matrix of order m (the smallest such m), or None."""
    if n <= 0:
        raise LowbitError(f"a Hadamard size must be positive, got {n}")
    pow2 = n & -n
    while pow2 >= 1:
        m = n // pow2
        if _known_order(m) is not None:
            return pow2, m
        pow2 //= 2
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """Explicit normalized (orthogonal) Hadamard matrix of order n, float64: H_{2^k} kron H_m / sqrt(n)."""
    split = factorize(n)
    if split is None:
        raise LowbitError(f"no Hadamard matrix of order {n} is known here (n must be 2^k * m with m a Paley order "
                          f"or a product of them); use orthogonal_matrix for a random orthogonal fallback")
    pow2, m = split
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < pow2:
        sylvester = torch.kron(sylvester, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return torch.kron(sylvester, _known_order(m)) / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last axis (a power of two), Sylvester order."""
    n = x.shape[-1]
    if n & (n - 1):
        raise LowbitError(f"the fast Walsh-Hadamard transform needs a power-of-two size, got {n}")
    shape = x.shape
    h = 1
    while h < n:
        y = x.reshape(*shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x -> H x for each vector along the last axis (x @ H^T), with H = hadamard_matrix(n), in O(n log n + n m).

    The index i = a*m + b splits the vector into a [2^k, m] grid: the Sylvester factor acts on a by the
    butterfly, the dense order-m factor on b by a small matmul.
    """
    n = x.shape[-1]
    split = factorize(n)
    if split is None:
        raise LowbitError(f"no Hadamard matrix of order {n} is known here; use a random orthogonal transform")
    pow2, m = split
    grid = x.reshape(*x.shape[:-1], pow2, m)
    if m > 1:
        grid = grid @ _known_order(m).to(x.dtype).T
    grid = fwht(grid.transpose(-1, -2)).transpose(-1, -2)
    return grid.reshape(x.shape) / math.sqrt(n)


def orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """Seeded random orthogonal matrix of order n (float64): the random Hadamard diag(s) H if H_n is known,
    else the Q of a QR decomposition of a Gaussian matrix (the documented fallback)."""
    gen = torch.Generator().manual_seed(seed)
    if factorize(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return signs[:, None] * hadamard_matrix(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]

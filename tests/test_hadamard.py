"""The Hadamard matrices are orthogonal and the fast transforms equal the explicit matrix products."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.hadamard import factorize, fwht, hadamard_matrix, hadamard_transform, orthogonal_matrix, paley_hadamard


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 12, 24, 48, 72, 144, 576, 1536, 20])
def test_matrix_is_orthogonal_and_fast_transform_matches(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs() * n**0.5, torch.ones(n, n, dtype=torch.float64))  # entries +-1/sqrt(n)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ h.T, atol=1e-10)
    assert torch.allclose(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))


def test_fwht_is_sylvester():
    x = torch.randn(4, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x) / 32**0.5, x @ hadamard_matrix(32), atol=1e-10)
    with pytest.raises(LowbitError, match="power-of-two"):
        fwht(torch.randn(12))


def test_paley_order_12():
    h = paley_hadamard(11)
    assert h.shape == (12, 12)
    assert torch.equal(h @ h.T, 12 * torch.eye(12, dtype=torch.float64))
    with pytest.raises(LowbitError, match="prime"):
        paley_hadamard(13)


def test_factorization_of_model_sizes():
    assert factorize(1536) == (128, 12)
    pow2, m = factorize(576)
    assert pow2 * m == 576 and pow2 & (pow2 - 1) == 0
    assert factorize(36) is None  # no construction here: the random orthogonal fallback is used
    with pytest.raises(LowbitError, match="no Hadamard"):
        hadamard_matrix(36)


@pytest.mark.parametrize("n", [36, 48])
def test_orthogonal_matrix_seeded(n):
    q = orthogonal_matrix(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, orthogonal_matrix(n, seed=3))
    assert not torch.equal(q, orthogonal_matrix(n, seed=4))

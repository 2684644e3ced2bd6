import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny
from lowbit import gemm
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models import get_adapter
from lowbit.steps.gptq import UpperGram

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding of sums of products (relative to the products' scale)."""
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@onednn
@pytest.mark.parametrize("shape", [(37, 96), (3, 41, 96)])
def test_linear_equals_torch_to_float32_rounding(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(80, 96), torch.randn(80)
    assert gemm.backend() == "onednn"
    y = gemm.linear(x, w, b)
    _close(y, F.linear(x, w, b))
    _close(gemm.linear(x[..., ::2], w[:, ::2]), F.linear(x[..., ::2], w[:, ::2]))  # strided operands
    _close(gemm.linear(x, w[:1].expand(80, 96)), F.linear(x, w[:1].expand(80, 96)))  # a broadcast weight
    for rows, cols in ((0, 96), (5, 0)):  # empty operands (oneDNN refuses an empty inner dimension)
        assert torch.equal(gemm.linear(torch.ones(rows, cols), torch.ones(80, cols)), torch.zeros(rows, 80))


@onednn
def test_each_row_is_the_same_bits_whatever_the_rows_computed_with_it():
    """The pipeline's block calls on the CPU group windows differently from the plan's batches
    (`CPU_CALL_TOKENS`): that is exact only if a row's product does not depend on the other rows."""
    torch.manual_seed(0)
    x, w = torch.randn(2048, 576), torch.randn(1536, 576)
    full = gemm.linear(x, w)
    for rows in (7, 64, 512, 1024):
        assert torch.equal(gemm.linear(x[:rows], w), full[:rows]), rows


def test_torch_backend_is_torch_bit_for_bit_and_a_wrong_one_is_refused(monkeypatch, capsys):
    torch.manual_seed(0)
    x, w = torch.randn(33, 64), torch.randn(48, 64)
    monkeypatch.setenv("LOWBIT_CPU_GEMM", "torch")
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    monkeypatch.setenv("LOWBIT_CPU_GEMM", "mkl")
    with pytest.raises(LowbitError, match="LOWBIT_CPU_GEMM='mkl'"):
        gemm.linear(x, w)
    assert main(["steps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LOWBIT_CPU_GEMM" in err[0]


@onednn
def test_routed_model_matches_and_trains_like_torch():
    model, routed = make_tiny("llama"), make_tiny("llama")
    get_adapter(routed).prepare(routed)
    lin = routed.model.layers[0].self_attn.q_proj
    assert lin.forward.__func__ is gemm._linear_forward
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        _close(routed(ids).logits, model(ids).logits)
    # products that record gradients run F.linear: the same gradients, bit for bit
    x = torch.randn(5, 64, requires_grad=True)
    ref = model.model.layers[0].self_attn.q_proj
    g, = torch.autograd.grad(lin(x).square().sum(), x)
    g_ref, = torch.autograd.grad(ref(x).square().sum(), x)
    assert torch.equal(g, g_ref)


@onednn
def test_gram_through_onednn_matches_torch(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(300, 70)
    grams = {}
    for backend in ("onednn", "torch"):
        monkeypatch.setenv("LOWBIT_CPU_GEMM", backend)
        gram = UpperGram(70, strip=16)
        gram.add(x)
        grams[backend] = gram.matrix(1, 1)
    _close(grams["onednn"], grams["torch"])
    _close(grams["onednn"], (x.double().T @ x.double()).float())

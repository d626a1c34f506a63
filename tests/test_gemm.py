"""hpclm._C.gemm_packed (the inference matmul) on every CPU path against a float64 reference, and
PackedLinear's gate and fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hpclm._C", reason="hpclm._C is not built (pip install -e .)")
from hpclm.kernels.gemm import PackedLinear, gemm_available  # noqa: E402

@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 17, 5), (3, 16, 33), (13, 65, 384), (16, 1536, 384), (31, 40, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_every_path_matches_float64(cpu_path, M, N, K, bias):
    torch.manual_seed(M * N + K)
    lin = torch.nn.Linear(K, N, bias=bias)
    wide = torch.randn(M, K + 3)  # rows with a stride longer than K
    x = wide[:, 1:K + 1]
    ref = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    got = PackedLinear(lin)(x)
    assert got.shape == (M, N) and got.dtype == torch.float32
    tol = 1e-6 * (K ** 0.5) * ref.abs().max().item() + 1e-6
    assert (got.double() - ref).abs().max().item() <= tol, cpu_path


def test_a_row_is_the_same_alone_and_in_any_batch(cpu_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 200)
    fast, x = PackedLinear(lin), torch.randn(40, 384)
    batched = fast(x)
    for rows in ([7], [0, 1, 2], list(range(3, 20))):
        assert torch.equal(fast(x[rows]), batched[rows]), (cpu_path, rows)


def test_gate_and_fallback():
    lin = torch.nn.Linear(8, 5).to(torch.bfloat16)
    ok, why = gemm_available(lin.weight)
    assert not ok and "float32 CPU weights" in why
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight, lin.bias))
    assert gemm_available(torch.nn.Linear(8, 5).weight) == (True, "")
    lin64 = torch.nn.Linear(8, 5).double()
    x64 = torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(PackedLinear(lin64)(x64), F.linear(x64, lin64.weight, lin64.bias))

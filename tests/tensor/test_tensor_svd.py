"""Truncated SVD: Eckart-Young, determinism, validation."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import gen

from tensorslim.tensor import rel_error, svd


def decaying_matrix(m=120, n=90, seed=0, dtype=torch.float64):
    """A matrix with geometrically decaying singular values s_i = 0.8^i."""
    g = gen(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype)).Q
    s = 0.8 ** torch.arange(k, dtype=dtype)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_full_svd_eckart_young(rank):
    a, s = decaying_matrix()
    res = svd(a, rank, method="full")
    assert res.U.shape == (120, rank) and res.S.shape == (rank,) and res.Vh.shape == (rank, 90)
    expected = float(s[rank:].norm() / s.norm())
    assert rel_error(a, res.to_tensor()) == pytest.approx(expected, rel=1e-9)
    assert res.errors[0] == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(res.S, s[:rank], rtol=1e-10)
    assert torch.allclose(res.U.T @ res.U, torch.eye(rank, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("rank", [5, 20])
def test_randomized_svd_eckart_young(rank):
    a, s = decaying_matrix(300, 200)
    res = svd(a, rank, method="randomized", n_power_iter=2)
    expected = float(s[rank:].norm() / s.norm())
    assert rel_error(a, res.to_tensor()) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(res.S, s[:rank], rtol=1e-6)


def test_randomized_matches_full_on_noisy_lowrank():
    g = gen(3)
    a = torch.randn(600, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 700, generator=g,
                                                                            dtype=torch.float64)
    a = a + 0.01 * a.norm() / 650 * torch.randn(600, 700, generator=g, dtype=torch.float64)
    full, rnd = svd(a, 40, method="full"), svd(a, 40, method="randomized")
    assert rnd.errors[0] <= full.errors[0] * (1 + 1e-6)
    auto = svd(a, 40)  # auto picks randomized for a big matrix and a small rank
    assert auto.errors[0] == pytest.approx(rnd.errors[0], rel=1e-12)


def test_svd_error_monotone_in_rank():
    a = torch.randn(40, 30, generator=gen(), dtype=torch.float64)
    errs = [svd(a, r).errors[0] for r in range(1, 31)]
    assert all(e1 >= e2 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 1e-12


def test_svd_deterministic_signs():
    a = torch.randn(50, 40, generator=gen(), dtype=torch.float64)
    r1, r2 = svd(a, 10), svd(a.clone(), 10)
    assert torch.equal(r1.U, r2.U) and torch.equal(r1.Vh, r2.Vh)
    idx = r1.U.abs().argmax(0)
    assert (r1.U[idx, torch.arange(10)] > 0).all()
    rr1 = svd(a, 5, method="randomized", seed=4)
    rr2 = svd(a, 5, method="randomized", seed=4)
    assert torch.equal(rr1.U, rr2.U)


def test_svd_float32():
    a, s = decaying_matrix(dtype=torch.float32)
    res = svd(a, 10)
    assert res.U.dtype == torch.float32
    assert rel_error(a, res.to_tensor()) == pytest.approx(float(s[10:].norm() / s.norm()), rel=1e-4)


def test_svd_validation():
    a = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        svd(a, 0)
    with pytest.raises(ValueError, match="rank=5 exceeds min"):
        svd(a, 5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        svd(a.numpy(), 2)
    with pytest.raises(ValueError, match="2-D"):
        svd(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="known: 'auto', 'full', 'randomized'"):
        svd(a, 2, method="lanczos")
    with pytest.raises(TypeError, match="float32 or float64"):
        svd(torch.ones(3, 3, dtype=torch.int64), 1)

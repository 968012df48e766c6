"""Tucker / partial Tucker (HOSVD + HOOI)."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import known_tucker, noisy

from tensorslim.tensor import rel_error, tucker


def test_tucker_exact_recovery_full():
    x = known_tucker((10, 11, 12), (3, 4, 5))
    tk = tucker(x, (3, 4, 5))
    assert rel_error(x, tk.to_tensor()) < 1e-10
    assert tk.core.shape == (3, 4, 5) and tk.ranks == (3, 4, 5) and tk.modes == (0, 1, 2)
    for f in tk.factors:
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1], dtype=torch.float64), atol=1e-12)


def test_tucker2_partial_modes_exact_recovery():
    x = known_tucker((16, 12, 3, 3), (5, 4), modes=(0, 1))
    tk = tucker(x, (5, 4), modes=(0, 1))
    assert rel_error(x, tk.to_tensor()) < 1e-10
    assert tk.core.shape == (5, 4, 3, 3)
    assert tk.shape == (16, 12, 3, 3)
    assert tk.num_params() == 5 * 4 * 9 + 16 * 5 + 12 * 4


def test_tucker_hooi_improves_on_hosvd_and_matches_reported_error():
    x = noisy(known_tucker((20, 18, 3, 3), (6, 5), modes=(0, 1)), 0.2)
    tk = tucker(x, (6, 5), modes=(0, 1), n_iter=30)
    assert tk.errors[-1] <= tk.errors[0] + 1e-12
    assert tk.errors[-1] == pytest.approx(rel_error(x, tk.to_tensor()), rel=1e-9)
    assert all(e1 >= e2 - 1e-12 for e1, e2 in zip(tk.errors, tk.errors[1:]))  # HOOI is monotone


def test_tucker_error_non_increasing_in_rank():
    x = torch.randn(12, 10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = [tucker(x, (r, r, r), n_iter=20).errors[-1] for r in (1, 2, 4, 6, 8)]
    assert all(e1 >= e2 - 1e-12 for e1, e2 in zip(errs, errs[1:]))
    assert tucker(x, (12, 10, 8)).errors[-1] < 1e-12


def test_tucker_deterministic_and_random_init():
    x = noisy(known_tucker((9, 8, 7), (3, 3, 3), seed=1), 0.1)
    a, b = tucker(x, 3), tucker(x.clone(), 3)
    assert torch.equal(a.core, b.core)
    assert all(torch.equal(p, q) for p, q in zip(a.factors, b.factors))
    r1, r2 = tucker(x, 3, init="random", seed=5), tucker(x, 3, init="random", seed=5)
    assert torch.equal(r1.core, r2.core)
    # a clear low-rank structure: random starts reach the HOSVD+HOOI optimum
    assert r1.errors[-1] == pytest.approx(a.errors[-1], rel=1e-6)


def test_tucker_float32():
    x = known_tucker((30, 20, 3, 3), (4, 6), modes=(0, 1), dtype=torch.float32)
    tk = tucker(x, (4, 6), modes=(0, 1))
    assert tk.core.dtype == torch.float32
    assert rel_error(x, tk.to_tensor()) < 1e-5


def test_tucker_validation():
    x = torch.randn(6, 5, 3, 3)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        tucker(x, (0, 2), modes=(0, 1))
    with pytest.raises(ValueError, match="ranks entry 7 for mode 1 exceeds its size 5"):
        tucker(x, (2, 7), modes=(0, 1))
    with pytest.raises(ValueError, match="one entry per decomposed mode"):
        tucker(x, (2, 2, 2), modes=(0, 1))
    with pytest.raises(ValueError, match="distinct"):
        tucker(x, (2, 2), modes=(0, 0))
    with pytest.raises(ValueError, match="out of range"):
        tucker(x, (2, 2), modes=(0, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tucker([[1.0]], 1)
    with pytest.raises(ValueError, match="known: 'hosvd', 'random'"):
        tucker(x, 2, init="svd")

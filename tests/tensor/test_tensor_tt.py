"""TT-SVD and TT-matrices."""
from __future__ import annotations

import math

import pytest
import torch
from _tensor_helpers import gen, known_tt

from tensorslim.tensor import rel_error, tt_matrix, tt_svd


def test_tt_exact_recovery_with_known_ranks():
    x = known_tt((4, 5, 6, 3), (2, 3, 2))
    tt = tt_svd(x, (2, 3, 2))
    assert tt.ranks == (1, 2, 3, 2, 1)
    assert rel_error(x, tt.to_tensor()) < 1e-10
    assert [tuple(c.shape) for c in tt.cores] == [(1, 4, 2), (2, 5, 3), (3, 6, 2), (2, 3, 1)]
    assert tt.num_params() == 8 + 30 + 36 + 6


def test_tt_eps_finds_the_ranks_and_meets_accuracy():
    x = known_tt((4, 5, 6, 3), (2, 3, 2))
    assert tt_svd(x, eps=1e-10).ranks == (1, 2, 3, 2, 1)
    y = torch.randn(4, 5, 6, 7, generator=gen(), dtype=torch.float64)
    for eps in (0.1, 0.3, 0.6):
        tt = tt_svd(y, eps=eps)
        err = rel_error(y, tt.to_tensor())
        assert err <= eps
        assert tt.errors[0] == pytest.approx(err, rel=1e-8)


def test_tt_full_rank_is_exact_and_ranks_are_capped():
    y = torch.randn(3, 4, 5, generator=gen(), dtype=torch.float64)
    tt = tt_svd(y)
    assert rel_error(y, tt.to_tensor()) < 1e-12
    assert tt_svd(y, 100).ranks == (1, 3, 5, 1)  # the max ranks a bond can have


def test_tt_error_non_increasing_in_rank():
    y = torch.randn(4, 5, 6, 7, generator=gen(1), dtype=torch.float64)
    errs = [tt_svd(y, r).errors[0] for r in (1, 2, 4, 8, 16, 35)]
    assert all(e1 >= e2 - 1e-12 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 1e-12


def test_tt_matrix_round_trip_and_known_rank():
    w = torch.randn(12, 20, generator=gen(), dtype=torch.float64)
    tm = tt_matrix(w, in_modes=(4, 5), out_modes=(3, 4))
    assert tm.shape == (12, 20) and rel_error(w, tm.to_tensor()) < 1e-12
    assert [tuple(c.shape) for c in tm.cores] == [(1, 3, 4, 12), (12, 4, 5, 1)]
    # a Kronecker product of two matrices has TT-matrix rank 1
    a = torch.randn(3, 4, generator=gen(1), dtype=torch.float64)
    b = torch.randn(4, 5, generator=gen(2), dtype=torch.float64)
    tm = tt_matrix(torch.kron(a, b), (4, 5), (3, 4), ranks=1)
    assert tm.ranks == (1, 1, 1) and rel_error(torch.kron(a, b), tm.to_tensor()) < 1e-12


def test_tt_matrix_three_cores_eps():
    w = torch.randn(24, 60, generator=gen(3), dtype=torch.float64)
    tm = tt_matrix(w, (3, 4, 5), (2, 3, 4), eps=0.5)
    err = rel_error(w, tm.to_tensor())
    assert err <= 0.5 and tm.errors[0] == pytest.approx(err, rel=1e-8)
    assert tm.num_params() == sum(c.numel() for c in tm.cores) < w.numel()


def test_tt_float32():
    x = known_tt((4, 5, 6), (2, 3), dtype=torch.float32)
    tt = tt_svd(x, (2, 3))
    assert tt.cores[0].dtype == torch.float32 and rel_error(x, tt.to_tensor()) < 1e-5


def test_tt_validation():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="ranks must be >= 1, got 0"):
        tt_svd(x, 0)
    with pytest.raises(ValueError, match="d - 1 = 2 entries"):
        tt_svd(x, (2, 2, 2))
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        tt_svd(x, eps=-0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tt_svd("x")
    w = torch.randn(12, 20)
    with pytest.raises(ValueError, match=r"in_modes \(4, 4\) \(product 16, must equal N=20\)"):
        tt_matrix(w, (4, 4), (3, 4))
    with pytest.raises(ValueError, match="same length"):
        tt_matrix(w, (4, 5), (12,))
    assert math.prod((3, 4)) == 12

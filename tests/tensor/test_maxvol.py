"""maxvol / rect_maxvol against brute force and a recomputing reference (float64)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import tensorslim as ts
from tensorslim.tensor import maxvol, rect_maxvol


def _mat(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64)


def _vol(A: torch.Tensor, rows) -> float:
    return abs(float(torch.linalg.det(A[torch.as_tensor(list(rows))])))


@pytest.mark.parametrize("n,r,seed", [(8, 2, 0), (9, 3, 1), (10, 4, 2), (12, 3, 3)])
def test_maxvol_within_bound_of_brute_force(n, r, seed):
    A, tol = _mat(n, r, seed), 1.05
    rows = maxvol(A, tol=tol)
    assert rows.dtype == torch.long and len(set(rows.tolist())) == r
    B = A @ torch.linalg.inv(A[rows])
    assert float(B.abs().max()) <= tol + 1e-12  # dominance: every coefficient <= tol
    best = max(_vol(A, c) for c in itertools.combinations(range(n), r))
    # Hadamard: any other r rows have volume <= (tol sqrt(r))^r times the selected one
    assert best <= _vol(A, rows) * (tol * math.sqrt(r)) ** r * (1 + 1e-12)
    assert _vol(A, rows) >= best / (tol * math.sqrt(r)) ** r


def test_maxvol_finds_the_planted_identity_rows():
    # rows 5..7 hold 10 * I: by far the largest volume, and every other coefficient is < 1
    A = _mat(12, 3, 4) * 0.1
    A[5:8] = 10 * torch.eye(3, dtype=torch.float64)
    assert sorted(maxvol(A, tol=1.0).tolist()) == [5, 6, 7]


def _rect_reference(A: torch.Tensor, P: int) -> list[int]:
    """Greedy rectangular maxvol with C = A pinv(A[rows]) recomputed at every step."""
    rows = maxvol(A).tolist()
    while len(rows) < P:
        C = A @ torch.linalg.pinv(A[rows])
        norms = (C * C).sum(1)
        norms[rows] = -1.0
        rows.append(int(torch.argmax(norms)))
    return rows


@pytest.mark.parametrize("P", [3, 4, 7, 15, 40])
def test_rect_maxvol_matches_recomputed_greedy(P):
    A = _mat(40, 3, 5)
    rows = rect_maxvol(A, P)
    assert rows.tolist() == _rect_reference(A, P)
    assert len(set(rows.tolist())) == P
    # every row is a combination of the selected ones with coefficient norm <= sqrt(r) * tol
    # (maxvol's bound; adding rows can only shrink the minimal-norm coefficients)
    C = A @ torch.linalg.pinv(A[rows])
    torch.testing.assert_close(C @ A[rows], A, rtol=0, atol=1e-10)
    assert float((C ** 2).sum(1).max()) <= 3 * 1.05 ** 2 + 1e-9


def test_rect_maxvol_of_square_identity_is_all_rows_and_deterministic():
    assert rect_maxvol(torch.eye(5, dtype=torch.float64), 5).tolist() == [0, 1, 2, 3, 4]
    A = _mat(30, 4, 6).float()
    assert torch.equal(rect_maxvol(A, 9), rect_maxvol(A, 9))
    assert torch.equal(ts.tensor.maxvol(A), maxvol(A))


def test_maxvol_rejects_bad_input():
    with pytest.raises(ValueError, match="tall"):
        maxvol(_mat(2, 3, 0))
    with pytest.raises(ValueError, match="tol must be"):
        maxvol(_mat(5, 2, 0), tol=0.5)
    with pytest.raises(ValueError, match="P must be"):
        rect_maxvol(_mat(5, 2, 0), 6)
    with pytest.raises(ValueError, match="rank"):
        maxvol(torch.ones(5, 2, dtype=torch.float64))

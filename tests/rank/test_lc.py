"""The LC C-step in closed form (tensorslim.rank.lc) against brute force in float64."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from tensorslim.rank.lc import (bisect_lam, lc_rank, lc_rank_pair, matrix_errors,
                                tucker2_errors, tucker2_spectrum)


def _matrix(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (m, n) float64 matrix with a random decreasing spectrum, and that spectrum."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) * 3, descending=True).values
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.t(), s


def _brute_matrix(w, cost, lam, mu, dense):
    """Every rank's objective from the actual truncation error; None = dense (which wins
    ties; ``dense=math.inf``: no dense option)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    objs = {}
    for r in range(1, len(s) + 1):
        if cost[r - 1] >= dense:
            continue
        approx = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        objs[r] = lam * float(cost[r - 1]) + mu / 2 * float(((w - approx) ** 2).sum())
    arg = min(objs, key=lambda r: (objs[r], r))
    return None if math.isfinite(dense) and lam * dense <= objs[arg] + 1e-12 else arg


@pytest.mark.parametrize("seed", range(6))
def test_matrix_rank_equals_brute_force(seed):
    m, n = (7, 5) if seed % 2 else (6, 9)
    w, s = _matrix(m, n, seed)
    err = matrix_errors(s)
    ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
    cost = ranks * (m + n)  # an SVD layer's params
    for lam, mu in [(1e-3, 1.0), (0.01, 0.5), (0.05, 2.0), (0.2, 1.0)]:
        assert lc_rank(err, cost, lam, mu, dense_cost=m * n) == _brute_matrix(w, cost, lam, mu, m * n)
        assert lc_rank(err, cost, lam, mu) == (_brute_matrix(w, cost, lam, mu, math.inf) or len(s))
    # Eckart-Young: the errors are the truncations' squared errors
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    for r in range(1, len(s) + 1):
        exact = float(((w - u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]) ** 2).sum())
        assert float(err[r - 1]) == pytest.approx(exact, rel=1e-9, abs=1e-10)


def _tucker_cost(s_in: int, t_out: int, k: int) -> torch.Tensor:
    """Params of a Tucker-2 conv per (r_in, r_out): S r_in + r_in r_out k + r_out T."""
    ri = torch.arange(1, s_in + 1, dtype=torch.float64)[:, None]
    ro = torch.arange(1, t_out + 1, dtype=torch.float64)[None, :]
    return s_in * ri + ri * ro * k + ro * t_out


@pytest.mark.parametrize("seed", range(4))
def test_tucker2_pair_equals_brute_force_over_all_pairs(seed):
    g = torch.Generator().manual_seed(10 + seed)
    t_out, s_in = (6, 5) if seed % 2 else (4, 7)
    scale = torch.logspace(0, -2, t_out, dtype=torch.float64)[:, None, None, None]
    w = torch.randn(t_out, s_in, 3, 3, generator=g, dtype=torch.float64) * scale
    spec = tucker2_spectrum(w)
    err = tucker2_errors(spec.energy, spec.norm2)
    cost = _tucker_cost(s_in, t_out, 9)
    dense = t_out * s_in * 9
    # the errors are the actual projection errors of every pair
    for ri, ro in itertools.product(range(1, s_in + 1), range(1, t_out + 1)):
        exact = float(((w - spec.project(w, (ri, ro))) ** 2).sum())
        assert float(err[ri - 1, ro - 1]) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    for lam, mu in [(1e-4, 1.0), (1e-3, 1.0), (3e-3, 0.5), (0.01, 1.0), (0.05, 1.0)]:
        best, arg = lam * dense, None
        for ri, ro in itertools.product(range(1, s_in + 1), range(1, t_out + 1)):
            c = float(cost[ri - 1, ro - 1])
            if c >= dense:
                continue
            obj = lam * c + mu / 2 * float(((w - spec.project(w, (ri, ro))) ** 2).sum())
            if obj < best - 1e-12:
                best, arg = obj, (ri, ro)
        assert lc_rank_pair(err, cost, lam, mu, dense_cost=dense) == arg


def test_lambda_zero_keeps_full_rank_and_huge_lambda_gives_minimum_ranks():
    w, s = _matrix(8, 6, 0)
    err, cost = matrix_errors(s), torch.arange(1, 7, dtype=torch.float64) * 14
    assert lc_rank(err, cost, 0.0, 1.0, dense_cost=48) is None  # dense = full rank
    assert lc_rank(err, cost, 0.0, 1.0) == 6
    assert lc_rank(err, cost, 1e9, 1.0, dense_cost=48) == 1
    k = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = tucker2_spectrum(k)
    e2, c2 = tucker2_errors(spec.energy, spec.norm2), _tucker_cost(4, 5, 9)
    assert lc_rank_pair(e2, c2, 0.0, 1.0, dense_cost=180) is None
    assert lc_rank_pair(e2, c2, 0.0, 1.0) == (4, 5)
    assert lc_rank_pair(e2, c2, 1e9, 1.0, dense_cost=180) == (1, 1)


def test_bisection_finds_the_smallest_lambda_meeting_a_target():
    mats = [_matrix(12, 10, i) for i in range(3)]
    errs = [matrix_errors(s) for _, s in mats]
    cost = torch.arange(1, 11, dtype=torch.float64) * 22

    def total(lam):
        return sum(float(cost[lc_rank(e, cost, lam, 1.0, dense_cost=120) - 1])
                   if lc_rank(e, cost, lam, 1.0, dense_cost=120) else 120.0 for e in errs)

    for target in (70.0, 150.0, 250.0):
        lam, c = bisect_lam(total, target, lam_hi=1e3)
        assert c == total(lam) <= target
        assert total(lam * (1 - 1e-6)) > target  # a slightly smaller price misses it
    with pytest.raises(ValueError, match="unreachable"):
        bisect_lam(total, 10.0, lam_hi=1e3)


def test_bad_arguments_are_refused():
    e = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="lam must be"):
        lc_rank(e, e, -1.0, 1.0)
    with pytest.raises(ValueError, match="mu must be"):
        lc_rank(e, e, 1.0, 0.0)
    with pytest.raises(ValueError, match="one cost per candidate"):
        lc_rank(e, torch.zeros(4), 1.0, 1.0)


def test_fill_budget_spends_the_leftover_without_exceeding_it():
    from tensorslim.rank.lc import fill_budget

    g = torch.Generator().manual_seed(5)
    errs, costs = [], []
    for _ in range(3):  # flat spectra: the price jumps from dense straight to rank 1
        s = torch.ones(8, dtype=torch.float64) + 0.01 * torch.rand(8, generator=g, dtype=torch.float64)
        errs.append(matrix_errors(torch.sort(s, descending=True).values))
        costs.append(torch.arange(1, 9, dtype=torch.float64) * 2.0)
    dense, budget = [12.0] * 3, 20.0
    start = [lc_rank(e, c, 1e3, 1.0, dense_cost=12.0) for e, c in zip(errs, costs)]
    assert start == [1, 1, 1]
    flat = fill_budget(errs, costs, dense, [r - 1 for r in start], budget)
    spent = sum(dense[i] if j is None else float(costs[i][j]) for i, j in enumerate(flat))
    assert 18.0 <= spent <= budget  # within one rank step of the budget
    err = sum(0.0 if j is None else float(errs[i][j]) for i, j in enumerate(flat))
    assert err < sum(float(e[0]) for e in errs)
    left = budget - spent
    for i, j in enumerate(flat):  # no single affordable move lowers the error further
        now = dense[i] if j is None else float(costs[i][j])
        if j is None:
            continue
        better = [k for k in range(8) if float(costs[i][k]) <= now + left and errs[i][k] < errs[i][j]
                  and costs[i][k] < dense[i]]
        assert not better and not dense[i] <= now + left

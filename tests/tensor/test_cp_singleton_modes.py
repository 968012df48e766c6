"""CP-ALS and CPD-EPC on tensors with size-1 modes (issue 14, item 3).

A size-1 mode's factor is a (1, R) row that still scales every component; the MTTKRP used to
skip contracting it, so the fit was wrong while the reported error looked fine (e.g. a
(6, 4, 1, 7) kernel at rank 6 ended at relative error 36.5). Every shape drawn from sizes
{1, 2, 5} with at least one singleton mode, and Conv1d kernels (O, I, k), is checked: the error
the result reports equals the error measured from ``to_tensor()``, and a tensor of known rank
is recovered.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tensorslim.tensor import cp_als, cp_epc, rel_error

from _tensor_helpers import known_cp, noisy

SINGLETON_SHAPES = [s for d in (3, 4) for s in itertools.product((1, 2, 5), repeat=d) if 1 in s]
CONV1D_KERNELS = [(6, 4, 1), (16, 3, 1), (1, 8, 3), (8, 1, 5), (4, 4, 1)]
SHAPES = SINGLETON_SHAPES + CONV1D_KERNELS


def _assert_reports_measured(t: torch.Tensor, cp) -> float:
    """The reported error is read off Grams and MTTKRPs (||X||^2 - 2 <X, X^> + ||X^||^2), so it
    carries ~ eps of rounding in the *squared* relative error: compare squares."""
    measured = rel_error(t, cp.to_tensor())
    assert cp.errors[-1] ** 2 == pytest.approx(measured ** 2, rel=1e-9, abs=1e-12)
    return measured


def _true_rank(shape: tuple[int, ...]) -> int:
    """Rank of the known-CP tensor: a tensor with one mode > 1 is a vector (rank 1)."""
    return 2 if sum(s > 1 for s in shape) >= 2 else 1


def test_the_issue_probe_is_fitted():
    t = torch.randn(6, 4, 1, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for rank in (3, 6):
        measured = _assert_reports_measured(t, cp_als(t, rank))
        assert measured < 0.8  # a rank-R fit of a 6 x 4 x 7 tensor beats the zero model
    # the rank-6 model contains the rank-3 one's span: no worse than it
    assert cp_als(t, 6).errors[-1] <= cp_als(t, 3).errors[-1]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cp_als_reported_error_is_the_measured_error(shape):
    x = known_cp(shape, 2, seed=sum(shape))
    t = noisy(x, 0.3)
    for rank in (1, 3, 6):
        cp = cp_als(t, rank)
        assert cp.shape == shape
        err = _assert_reports_measured(t, cp)
        # a CP rank-R tensor has every unfolding of rank <= R: no fit beats their Eckart-Young
        # floors; from the true rank on, the fit is no worse than the noise-free tensor itself
        assert err >= _unfolding_floor(t, rank) - 1e-12
        if rank >= _true_rank(shape):
            assert err <= rel_error(t, x) * (1 + 1e-9), (rank, err, rel_error(t, x))


def _unfolding_floor(t: torch.Tensor, rank: int) -> float:
    """Largest Eckart-Young floor ||T - T_R|| / ||T|| over the mode unfoldings of ``t``."""
    floor = 0.0
    for mode in range(t.dim()):
        s = torch.linalg.svdvals(t.movedim(mode, 0).reshape(t.shape[mode], -1))
        floor = max(floor, float((s[rank:] ** 2).sum() / (s ** 2).sum()) ** 0.5)
    return floor


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cp_als_recovers_a_known_rank_tensor(shape):
    rank = _true_rank(shape)
    t = known_cp(shape, rank, seed=sum(shape))
    cp = cp_als(t, rank, n_iter=2000)
    assert rel_error(t, cp.to_tensor()) < 1e-8
    # more components than the tensor supports (a singular normal equation): still a close fit
    # whose error is reported truthfully (ALS converges slowly there, so no exact recovery)
    assert _assert_reports_measured(t, cp_als(t, rank + 2)) < 1e-3


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cp_epc_on_singleton_modes_meets_the_bound_it_reports(shape):
    t = noisy(known_cp(shape, 2, seed=sum(shape)), 0.3)
    als = cp_als(t, 3)
    epc = cp_epc(t, 3, init=als, n_iter=100)
    measured = _assert_reports_measured(t, epc)
    assert measured <= als.errors[-1] * (1 + 1e-9) + 1e-12  # default delta: the ALS error


def test_cp_epc_recovers_a_known_rank_kernel_with_a_singleton_mode():
    t = known_cp((6, 4, 1, 7), 3, seed=5)
    epc = cp_epc(t, 3, init=cp_als(t, 3, n_iter=2000))
    assert rel_error(t, epc.to_tensor()) < 1e-8

"""Input checks shared by every decomposition (issue 14, items 6 and 11): NaN/Inf entries are a
ValueError from one check in ``tensor/_common.py``, and CP ranks are range-checked before any
allocation."""
from __future__ import annotations


import pytest
import torch

import tensorslim.tensor._common as common
from tensorslim.tensor import (CPTensor, cp_als, cp_epc, rel_error, svd, tt_matrix, tt_svd,
                               tucker)

from _tensor_helpers import gen, known_cp

# every public decomposition, as (name, function of a tensor, the shape it needs)
DECOMPOSITIONS = {
    "svd": (lambda x: svd(x, 2, method="full"), (4, 6)),
    "svd_randomized": (lambda x: svd(x, 2, method="randomized"), (4, 6)),
    "tucker": (lambda x: tucker(x, 2), (4, 3, 5)),
    "tucker2": (lambda x: tucker(x, (2, 2), modes=(0, 1)), (4, 3, 3, 3)),
    "hosvd": (lambda x: tucker(x, 2, n_iter=0), (4, 3, 5)),
    "cp_als": (lambda x: cp_als(x, 2), (4, 3, 5)),
    "cp_epc": (lambda x: cp_epc(x, 2), (4, 3, 5)),
    "tt_svd": (lambda x: tt_svd(x, 2), (4, 3, 5)),
    "tt_matrix": (lambda x: tt_matrix(x, (2, 3), (2, 2), 2), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN, 0 Inf"),
                                         (float("inf"), "0 NaN, 1 Inf"),
                                         (-float("inf"), "0 NaN, 1 Inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_decomposition_refuses_non_finite_input(name, bad, counts, dtype):
    fn, shape = DECOMPOSITIONS[name]
    x = torch.randn(shape, generator=gen(0), dtype=dtype)
    fn(x)  # finite input is accepted
    x.view(-1)[3] = bad
    shape_txt = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"non-finite entries \({counts}\) in a tensor of "
                                         rf"shape {shape_txt}"):
        fn(x)


def test_non_finite_counts_are_exact():
    x = torch.randn(5, 6, dtype=torch.float64)
    x[0, :3] = float("nan")
    x[4, 5] = float("inf")
    x[2, 2] = -float("inf")
    with pytest.raises(ValueError, match=r"matrix has non-finite entries \(3 NaN, 2 Inf\)"):
        svd(x, 2)


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
def test_every_decomposition_uses_the_one_shared_finite_check(name, monkeypatch):
    fn, shape = DECOMPOSITIONS[name]
    calls = []
    real = common.check_finite
    monkeypatch.setattr(common, "check_finite", lambda t, n: calls.append(n) or real(t, n))
    fn(torch.randn(shape, generator=gen(0), dtype=torch.float64))
    assert calls, f"{name} does not call tensor._common.check_finite"


def test_cp_epc_refuses_a_non_finite_start():
    t = known_cp((4, 3, 5), 2)
    start = cp_als(t, 2)
    bad = list(start.factors)
    bad[1] = bad[1].clone()
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"init.factors\[1\] has non-finite entries \(1 NaN"):
        cp_epc(t, 2, init=CPTensor(weights=start.weights, factors=tuple(bad)))


@pytest.mark.parametrize("fn", [cp_als, cp_epc], ids=["cp_als", "cp_epc"])
def test_cp_rank_is_range_checked_before_allocating(fn):
    t = torch.randn(6, 4, 7, dtype=torch.float64, generator=gen(0))
    # factors of rank 1e9 would need 56 GB: allocating them would raise RuntimeError, so this
    # ValueError shows the rank was refused before anything was allocated
    with pytest.raises(ValueError, match=r"rank=1000000000 exceeds 10x the largest dimension "
                                         r"\(7\) .*accepted: 1 <= rank <= 70"):
        fn(t, 10**9)
    with pytest.raises(ValueError, match="accepted: 1 <= rank <= 70"):
        fn(t, 71)


def test_cp_rank_at_the_bound_is_accepted():
    t = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen(0))
    cp = cp_als(t, 40, n_iter=3)
    assert cp.rank == 40
    assert cp.errors[-1] ** 2 == pytest.approx(rel_error(t, cp.to_tensor()) ** 2, abs=1e-12)


def test_matrix_and_tucker_ranks_keep_their_mode_size_bounds():
    with pytest.raises(ValueError, match=r"rank=7 exceeds min\(m, n\)=4 .*1 <= rank <= 4"):
        svd(torch.randn(4, 6, dtype=torch.float64), 7)
    with pytest.raises(ValueError, match="ranks entry 1000000000 for mode 0 exceeds its size 4"):
        tucker(torch.randn(4, 3, 5, dtype=torch.float64), 10**9)


def test_tt_ranks_are_clipped_to_what_the_unfoldings_allow():
    t = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen(0))
    tt = tt_svd(t, 10**9)
    assert [c.shape[2] for c in tt.cores] == [4, 5, 1]
    assert rel_error(t, tt.to_tensor()) < 1e-12

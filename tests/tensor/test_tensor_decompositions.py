"""One parametrised test over every decomposition: shapes, dtypes, determinism, num_params,
error trace consistent with the rebuilt tensor, and input validation."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import gen

from tensorslim.tensor import cp_als, rel_error, svd, tt_matrix, tt_svd, tucker

# name -> (function of a tensor, input shape, expected num_params)
DECOMPOSITIONS = {
    "svd": (lambda x: svd(x, 3), (12, 10), 3 * (12 + 10)),
    "svd_randomized": (lambda x: svd(x, 3, method="randomized"), (12, 10), 3 * (12 + 10)),
    "cp_als": (lambda x: cp_als(x, 3, n_iter=30), (6, 5, 3, 3), 3 * (6 + 5 + 3 + 3)),
    "tucker": (lambda x: tucker(x, (2, 3, 2)), (6, 5, 4), 2 * 3 * 2 + 6 * 2 + 5 * 3 + 4 * 2),
    "tucker2": (lambda x: tucker(x, (4, 3), modes=(0, 1)), (6, 5, 3, 3),
                4 * 3 * 9 + 6 * 4 + 5 * 3),
    "tt_svd": (lambda x: tt_svd(x, 2), (4, 5, 6), 4 * 2 + 2 * 5 * 2 + 2 * 6),
    "tt_matrix": (lambda x: tt_matrix(x, (4, 5), (3, 4), 2), (12, 20), 3 * 4 * 2 + 2 * 4 * 5),
}


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


# name -> the (matrix, rank) pairs its result's rank bounds: every mode unfolding for CP, the
# kept modes for Tucker, the left/right splits of the train for TT
FLOORS = {
    "svd": lambda x: [(x, 3)],
    "svd_randomized": lambda x: [(x, 3)],
    "cp_als": lambda x: [(_unfold(x, m), 3) for m in range(4)],
    "tucker": lambda x: [(_unfold(x, m), r) for m, r in enumerate((2, 3, 2))],
    "tucker2": lambda x: [(_unfold(x, 0), 4), (_unfold(x, 1), 3)],
    "tt_svd": lambda x: [(x.reshape(4, -1), 2), (x.reshape(20, -1), 2)],
}


def _ey(mat: torch.Tensor, rank: int) -> float:
    """Eckart-Young floor ||M - M_r|| / ||M|| of a matrix (float64)."""
    s = torch.linalg.svdvals(mat.double())
    return float((s[rank:] ** 2).sum() / (s ** 2).sum()) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
def test_every_decomposition(name, dtype):
    fn, shape, n_params = DECOMPOSITIONS[name]
    x = torch.randn(shape, generator=gen(7), dtype=dtype)
    res = fn(x)
    rebuilt = res.to_tensor()
    assert rebuilt.shape == x.shape and rebuilt.dtype == dtype
    assert tuple(res.shape) == tuple(x.shape)
    assert res.num_params() == n_params
    assert len(res.errors) >= 1 and 0.0 < res.errors[-1] < 1.0
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    if name in FLOORS:  # no fit of that rank beats the Eckart-Young floor of its unfoldings
        floor = max(_ey(mat, r) for mat, r in FLOORS[name](x))
        assert res.errors[-1] >= floor * (1 - 1e-6), (res.errors[-1], floor)
        if name == "svd":  # the truncated SVD is the floor (Eckart-Young)
            assert res.errors[-1] == pytest.approx(floor, rel=tol)
    assert res.errors[-1] == pytest.approx(rel_error(x, rebuilt), rel=tol)
    again = fn(x.clone())
    assert torch.equal(again.to_tensor(), rebuilt)  # same input and seed -> same result


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
def test_every_decomposition_rejects_non_tensors(name):
    fn, shape, _ = DECOMPOSITIONS[name]
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(torch.randn(shape).tolist())
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(torch.ones(shape, dtype=torch.int32))

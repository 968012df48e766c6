"""CP-ALS: exact recovery, monotonicity, determinism, rank > mode size, validation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _tensor_helpers import known_cp, noisy

from tensorslim.tensor import cp_als, rel_error, unfold


@pytest.mark.parametrize("shape", [(9, 10, 11), (8, 7, 3, 3), (12, 10)])
def test_cp_exact_recovery(shape):
    x = known_cp(shape, 3)
    cp = cp_als(x, 3, n_iter=500, tol=1e-12)
    assert rel_error(x, cp.to_tensor()) < 1e-8
    assert cp.errors[-1] < 1e-8
    assert cp.errors[-1] == pytest.approx(rel_error(x, cp.to_tensor()), abs=1e-9)


def test_cp_4way_kernel_compressed_path():
    # 40 x 40 x 3 x 3 with rank 5: the modes > rank are Tucker-compressed first.
    x = known_cp((40, 40, 3, 3), 5, seed=2)
    cp = cp_als(x, 5, n_iter=500, tol=1e-12)
    assert rel_error(x, cp.to_tensor()) < 1e-8


def test_cp_result_structure():
    x = noisy(known_cp((10, 8, 3, 3), 4), 0.05)
    cp = cp_als(x, 4)
    assert cp.shape == (10, 8, 3, 3) and cp.rank == 4
    assert cp.to_tensor().shape == x.shape
    assert cp.num_params() == 4 * (10 + 8 + 3 + 3)
    assert (cp.weights[:-1] >= cp.weights[1:]).all()
    for f in cp.factors:
        assert torch.allclose(f.norm(dim=0), torch.ones(4, dtype=torch.float64), atol=1e-10)
    # the error trace is per sweep and ends at the true error
    assert cp.errors[-1] == pytest.approx(rel_error(x, cp.to_tensor()), rel=1e-6)


def test_cp_errors_non_increasing_in_rank():
    x = noisy(known_cp((12, 11, 10), 6, seed=3), 0.01)
    errs = [cp_als(x, r, n_iter=300, tol=1e-10).errors[-1] for r in (1, 2, 4, 6)]
    assert all(e1 >= e2 - 1e-9 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 0.02


def test_cp_same_seed_same_factors():
    x = torch.randn(10, 9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for init in ("svd", "random"):
        a = cp_als(x, 5, n_iter=20, init=init, seed=3)
        b = cp_als(x.clone(), 5, n_iter=20, init=init, seed=3)
        assert torch.equal(a.weights, b.weights)
        assert all(torch.equal(fa, fb) for fa, fb in zip(a.factors, b.factors))
        assert a.errors == b.errors


def test_cp_rank_above_mode_sizes():
    x = noisy(known_cp((6, 5, 3, 3), 8, seed=4), 0.01)
    cp = cp_als(x, 8, n_iter=300)
    assert all(f.shape[1] == 8 for f in cp.factors)
    assert rel_error(x, cp.to_tensor()) < 0.05


def test_cp_khatri_rao_identity_holds_for_result():
    from tensorslim.tensor import khatri_rao
    x = known_cp((5, 6, 7), 2)
    cp = cp_als(x, 2, n_iter=50)
    rebuilt = cp.to_tensor()
    f = cp.factors
    assert torch.allclose(unfold(rebuilt, 1),
                          f[1] @ torch.diag(cp.weights) @ khatri_rao([f[0], f[2]]).T, atol=1e-10)


def test_cp_float32():
    x = known_cp((20, 18, 3, 3), 4, dtype=torch.float32)
    cp = cp_als(x, 4, n_iter=300)
    assert cp.weights.dtype == torch.float32
    assert rel_error(x, cp.to_tensor()) < 1e-4


def test_cp_validation():
    x = torch.randn(4, 5, 6)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        cp_als(x, 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cp_als(x.numpy(), 2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cp_als(torch.randn(5), 2)
    with pytest.raises(ValueError, match="known: 'svd', 'random'"):
        cp_als(x, 2, init="nvecs")
    with pytest.raises(ValueError, match="tol"):
        cp_als(x, 2, tol=-1.0)


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 9, 2), (2, 3, 6, 4)])
def test_cp_to_tensor_equals_the_sum_of_rank_one_terms(shape):
    from tensorslim.tensor.results import CPTensor

    g = torch.Generator().manual_seed(0)
    r = 3
    factors = tuple(torch.randn(n, r, generator=g, dtype=torch.float64) for n in shape)
    weights = torch.randn(r, generator=g, dtype=torch.float64)
    want = torch.zeros(shape, dtype=torch.float64)
    for z in range(r):
        term = weights[z]
        for f in factors:
            term = torch.tensordot(torch.as_tensor(term), f[:, z], dims=0)
        want += term
    cp = CPTensor(weights=weights, factors=factors, errors=(0.0,))
    torch.testing.assert_close(cp.to_tensor(), want, rtol=1e-12, atol=1e-12)


def test_cp_to_tensor_of_a_large_kernel_stays_small_in_memory():
    # A left-to-right einsum built (512, 512, 3, 3, 570) float64 intermediates: 10.7 GB.
    code = ("import resource, torch; from tensorslim.tensor.results import CPTensor;"
            "f = tuple(torch.randn(n, 570, dtype=torch.float64) for n in (512, 512, 3, 3));"
            "x = CPTensor(weights=torch.ones(570, dtype=torch.float64), factors=f, errors=(0.0,)).to_tensor();"
            "print(tuple(x.shape), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shape, rss_kb = out.stdout.rsplit(" ", 1)
    assert shape == "(512, 512, 3, 3)" and int(rss_kb) < 1_500_000  # < 1.5 GB peak

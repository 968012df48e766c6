"""CPD-EPC: sensitivity vs its definition, intensities, the bound, degenerate CPs, exact fits,
the matrix case (nuclear norm), determinism, validation."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import gen, known_cp, noisy

from tensorslim.tensor import (CPTensor, component_intensities, cp_als, cp_epc, rel_error,
                               sensitivity)


def _random_cp(shape, rank, seed=0, weights=None):
    g = gen(seed)
    factors = tuple(torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape)
    w = torch.ones(rank, dtype=torch.float64) if weights is None else weights
    return CPTensor(weights=w, factors=factors)


def _jacobian_norms_sq(cp):
    """||d vec(X) / d vec(A_n)||_F^2 per mode: the summed variance of X under unit i.i.d.
    Gaussian perturbations of the entries of A_n, to first order (the paper's definition)."""
    def rebuild(*fs):
        return CPTensor(weights=cp.weights, factors=fs).to_tensor()
    jac = torch.autograd.functional.jacobian(rebuild, cp.factors)
    return [float((j ** 2).sum()) for j in jac]


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 4, 2, 3), (6, 5)])
def test_sensitivity_equals_jacobian_definition(shape):
    cp = _random_cp(shape, 3, seed=1)
    per_mode = _jacobian_norms_sq(cp)
    assert sensitivity(cp, per_entry=True) == pytest.approx(sum(per_mode), rel=1e-12)
    # default: each column perturbed with expected squared norm 1 (entries of variance 1/I_n)
    expected = sum(v / s for v, s in zip(per_mode, shape))
    assert sensitivity(cp) == pytest.approx(expected, rel=1e-12)


def test_sensitivity_3way_trace_formula_and_monte_carlo():
    cp = _random_cp((4, 3, 5), 3, seed=2)
    ga, gb, gc = (f.T @ f for f in cp.factors)
    trace = float(torch.trace(ga * gb + gb * gc + ga * gc))  # the seed's formula
    assert sensitivity(cp) == pytest.approx(trace, rel=1e-12)
    # Monte Carlo of E ||X - X(A + dA, ..)||^2 / s^2 with i.i.d. N(0, s^2) entries, s small
    g, s, n = gen(7), 1e-6, 4000
    x = cp.to_tensor()
    total = 0.0
    for _ in range(n):
        fs = [f + s * torch.randn(f.shape, generator=g, dtype=f.dtype) for f in cp.factors]
        total += float(((CPTensor(weights=cp.weights, factors=tuple(fs)).to_tensor() - x) ** 2).sum())
    assert total / (n * s * s) == pytest.approx(sensitivity(cp, per_entry=True), rel=0.05)


def test_sensitivity_absorbs_weights_evenly():
    w = torch.tensor([2.0, -0.5, 3.0], dtype=torch.float64)
    cp = _random_cp((4, 3, 5), 3, seed=3, weights=w)
    scale = w.abs() ** (1 / 3)
    absorbed = [f * scale for f in cp.factors]
    absorbed[0] = absorbed[0] * torch.sign(w)
    plain = CPTensor(weights=torch.ones(3, dtype=torch.float64), factors=tuple(absorbed))
    assert torch.allclose(plain.to_tensor(), cp.to_tensor(), atol=1e-12)
    assert sensitivity(cp) == pytest.approx(sensitivity(plain), rel=1e-12)
    # balanced columns: ss = N sum_r lambda_r^(2 (N-1) / N)
    unit = [f / f.norm(dim=0) for f in cp.factors]
    lam = w.abs() * torch.stack([f.norm(dim=0) for f in cp.factors]).prod(0)
    balanced = CPTensor(weights=lam, factors=tuple(unit))
    assert sensitivity(balanced) == pytest.approx(3 * float((lam ** (4 / 3)).sum()), rel=1e-12)


def test_component_intensities():
    w = torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64)
    cp = _random_cp((4, 3, 5), 3, seed=4, weights=w)
    one = [float(CPTensor(weights=cp.weights[r:r + 1], factors=tuple(f[:, r:r + 1] for f in cp.factors))
                 .to_tensor().norm()) for r in range(3)]
    assert component_intensities(cp, descending=False).tolist() == pytest.approx(one, rel=1e-12)
    assert component_intensities(cp).tolist() == pytest.approx(sorted(one, reverse=True), rel=1e-12)


def test_matrix_case_is_the_soft_thresholded_svd():
    # N = 2: ss = ||A||^2 + ||B||^2 >= 2 ||X||_*, so EPC = min nuclear norm s.t. ||M - X|| <= delta,
    # solved by soft-thresholding the singular values at the tau that gives error delta.
    m = torch.randn(8, 6, generator=gen(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    delta = 0.5 * float(m.norm())
    lo, hi = 0.0, float(s[0])
    for _ in range(200):
        tau = (lo + hi) / 2
        lo, hi = (tau, hi) if float(torch.clamp(s, max=tau).norm()) < delta else (lo, tau)
    shrunk = (s - tau).clamp_min(0)
    best = u @ torch.diag(shrunk) @ vh
    cp = cp_epc(m, 6, delta=delta, n_iter=2000, tol=1e-12)
    assert rel_error(best, cp.to_tensor()) < 1e-6
    assert float((m - cp.to_tensor()).norm()) <= delta * (1 + 1e-9)
    assert sensitivity(cp) == pytest.approx(2 * float(shrunk.sum()), rel=1e-7)


def _border_rank_tensor():
    """a o a o b + a o b o a + b o a o a: rank 3, but rank-2 tensors come arbitrarily close."""
    g = gen(1)
    a, b = (v / v.norm() for v in torch.randn(2, 4, generator=g, dtype=torch.float64))
    outer = lambda x, y, z: torch.einsum("i,j,k->ijk", x, y, z)  # noqa: E731
    return outer(a, a, b) + outer(a, b, a) + outer(b, a, a)


def test_als_diverges_on_a_degenerate_tensor_and_epc_meets_the_bound():
    t = _border_rank_tensor()
    runs = [cp_als(t, 2, n_iter=n, tol=0.0, init="random") for n in (10, 100, 1000)]
    errs = [r.errors[-1] for r in runs]
    peaks = [float(component_intensities(r)[0]) for r in runs]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3  # the fit keeps improving ...
    assert peaks[0] < peaks[1] < peaks[2] and peaks[2] > 5 * float(t.norm())  # ... by cancelling
    als = runs[-1]
    delta = float((t - als.to_tensor()).norm())
    epc = cp_epc(t, 2, init=als)
    assert float((t - epc.to_tensor()).norm()) <= delta * (1 + 1e-6)
    assert sensitivity(epc) <= sensitivity(als) * (1 + 1e-9)
    # a bound 50x looser than ALS's error removes the blow-up: the huge terms buy almost nothing
    loose = cp_epc(t, 2, init=als, delta=50 * delta)
    assert float((t - loose.to_tensor()).norm()) <= 50 * delta * (1 + 1e-6)
    assert float(component_intensities(loose)[0]) < peaks[2] / 4


def test_epc_removes_cancelling_components_at_the_als_error():
    # A random tensor where ALS ends in a swamp: huge cancelling rank-1 terms.
    t = torch.randn(8, 7, 6, generator=gen(0), dtype=torch.float64)
    als = cp_als(t, 8, n_iter=1000, tol=1e-12)
    assert float(component_intensities(als)[0]) > 50 * float(t.norm())  # degenerate start
    delta = float((t - als.to_tensor()).norm())
    epc = cp_epc(t, 8, init=als)
    assert float((t - epc.to_tensor()).norm()) <= delta * (1 + 1e-6)
    assert epc.errors[-1] == pytest.approx(rel_error(t, epc.to_tensor()), rel=1e-6)
    assert sensitivity(epc) < sensitivity(als) / 100  # orders of magnitude less sensitive
    assert float(component_intensities(epc)[0]) < float(component_intensities(als)[0]) / 50


@pytest.mark.parametrize("shape", [(9, 10, 11), (8, 7, 3, 3)])
def test_exact_low_rank_keeps_the_exact_fit(shape):
    x = known_cp(shape, 3)
    als = cp_als(x, 3, n_iter=500, tol=1e-12)
    epc = cp_epc(x, 3)
    assert rel_error(x, epc.to_tensor()) < 1e-10
    assert sensitivity(epc) <= sensitivity(als) * (1 + 1e-9)
    assert epc.shape == shape and epc.rank == 3
    for f in epc.factors:
        assert torch.allclose(f.norm(dim=0), torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert (epc.weights[:-1] >= epc.weights[1:]).all()


def test_larger_bound_gives_lower_sensitivity():
    x = noisy(known_cp((10, 9, 8), 4, seed=5), 0.2)
    base = cp_als(x, 4)
    delta = float((x - base.to_tensor()).norm())
    sens = []
    for f in (1.0, 1.05, 1.2):
        cp = cp_epc(x, 4, init=base, delta=f * delta)
        assert float((x - cp.to_tensor()).norm()) <= f * delta * (1 + 1e-6)
        sens.append(sensitivity(cp))
    assert sens[0] >= sens[1] >= sens[2] and sens[2] < 0.9 * sens[0]


def test_same_seed_same_result_and_float32():
    x = noisy(known_cp((10, 8, 3, 3), 4, seed=6), 0.1).float()
    a = cp_epc(x, 5, seed=3)
    b = cp_epc(x.clone(), 5, seed=3)
    assert torch.equal(a.weights, b.weights) and a.errors == b.errors
    assert all(torch.equal(fa, fb) for fa, fb in zip(a.factors, b.factors))
    assert a.weights.dtype == torch.float32 and all(f.dtype == torch.float32 for f in a.factors)
    delta = float((x.double() - cp_als(x, 5, seed=3).to_tensor().double()).norm())
    assert float((x.double() - a.to_tensor().double()).norm()) <= delta * (1 + 1e-5)


def test_zero_tensor():
    cp = cp_epc(torch.zeros(3, 4, 5, dtype=torch.float64), 2)
    assert float(cp.to_tensor().abs().max()) == 0.0 and cp.errors == (0.0,)


def test_validation_messages():
    x = torch.randn(4, 5, 6, generator=gen(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        cp_epc(x, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        cp_epc(x, 2.0)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        cp_epc(x.numpy(), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        cp_epc(x.long(), 2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cp_epc(x[0, 0], 2)
    for bad in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="delta must be a finite number > 0"):
            cp_epc(x, 2, delta=bad)
    with pytest.raises(ValueError, match="must be below"):
        cp_epc(x, 2, delta=2 * float(x.norm()))
    with pytest.raises(ValueError, match="shape \\(4, 5, 6\\) and rank 2"):
        cp_epc(x, 2, init=cp_als(x, 3))
    with pytest.raises(TypeError, match="init must be a CPTensor"):
        cp_epc(x, 2, init=[x])
    with pytest.raises(TypeError, match="cp must be a CPTensor"):
        sensitivity(x)

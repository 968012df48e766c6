"""Whitened (data-aware) SVD: the reduced-rank-regression optimum of the output error."""
from __future__ import annotations

import pytest
import torch

from tensorslim.tensor import (asvd, output_error_curve, reduced_rank_regression, row_weighted_svd,
                               svd, whitened_svd, whitening_factor)


def _data(n: int = 400, d_in: int = 24, d_out: int = 16, seed: int = 0):
    """Correlated, anisotropic inputs X (n, N) and a weight W (M, N), float64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 2, d_in, dtype=torch.float64)
    x = (torch.randn(n, d_in, generator=g, dtype=torch.float64) * scales) @ mix
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return x, w


def _out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_hat) @ x.T).square().sum())


def _rrr_reference(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Textbook reduced-rank regression: OLS fit, projected on the top-k principal directions
    of the fitted outputs (eigenvectors of Yhat^T Yhat), as B (N, M)."""
    b = torch.linalg.lstsq(x, y).solution
    fit = x @ b
    vecs = torch.linalg.eigh(fit.T @ fit).eigenvectors[:, -k:]
    return b @ vecs @ vecs.T


@pytest.mark.parametrize("k", [1, 5, 12, 16])
def test_whitened_svd_equals_reduced_rank_regression(k):
    x, w = _data()
    res = whitened_svd(w, x.T @ x, k)
    ref = _rrr_reference(x, x @ w.T, k).T
    assert res.shift == 0.0
    assert torch.linalg.matrix_rank(res.to_tensor()) == k
    assert float((res.to_tensor() - ref).abs().max()) < 1e-8 * float(ref.abs().max())
    # the curve is the exact relative squared output error at every rank
    total = float((w @ x.T).square().sum())
    assert abs(float(res.curve[k]) - _out_err(w, res.to_tensor(), x) / total) < 1e-10


def test_reduced_rank_regression_matches_reference_with_other_targets():
    x, w = _data(seed=1)
    y = x @ w.T + 0.3 * torch.randn(x.shape[0], w.shape[0], dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(3))
    b = reduced_rank_regression(x.T @ x, x.T @ y, 4)
    ref = _rrr_reference(x, y, 4)
    assert float((b - ref).abs().max()) < 1e-8 * float(ref.abs().max())
    full = reduced_rank_regression(x.T @ x, x.T @ y)
    assert torch.allclose(full, torch.linalg.lstsq(x, y).solution, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_beats_plain_svd_on_anisotropic_inputs(seed):
    x, w = _data(seed=seed)
    gram = x.T @ x
    for k in (2, 6, 10):
        plain = svd(w, k, method="full").to_tensor()
        white = whitened_svd(w, gram, k).to_tensor()
        scaled = asvd(w, x.abs().mean(0), k).to_tensor()
        assert _out_err(w, white, x) < _out_err(w, plain, x)
        assert _out_err(w, white, x) <= _out_err(w, scaled, x) + 1e-9


def test_isotropic_inputs_reduce_to_plain_svd():
    _, w = _data()
    res = whitened_svd(w, 7.0 * torch.eye(w.shape[1], dtype=torch.float64), 5)
    assert torch.allclose(res.to_tensor(), svd(w, 5, method="full").to_tensor(), atol=1e-10)
    s = torch.linalg.svdvals(w)
    tail = (s[5:] ** 2).sum() / (s ** 2).sum()
    assert abs(float(res.curve[5]) - float(tail)) < 1e-12


def test_singular_gram_gets_a_diagonal_shift_and_stays_exact_on_the_span():
    x, w = _data(n=10)  # 10 samples, 24 inputs: X^T X has rank 10
    res = whitened_svd(w, x.T @ x, 8)
    assert res.shift > 0
    t, shift = whitening_factor(x.T @ x)
    assert shift == res.shift and torch.isfinite(t).all()
    # full rank: outputs on the calibration inputs are reproduced
    full = whitened_svd(w, x.T @ x)
    assert float(((full.to_tensor() - w) @ x.T).abs().max()) < 1e-6 * float((w @ x.T).abs().max())


def test_curves_are_true_output_errors_for_every_variant():
    x, w = _data(seed=4)
    gram = x.T @ x
    total = float((w @ x.T).square().sum())
    scale = x.abs().mean(0)
    rows = torch.rand(w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    a = asvd(w, scale, gram=gram)
    f = row_weighted_svd(w, rows, gram=gram)
    for k in (0, 3, 9, 16):
        assert abs(float(a.curve[k]) - _out_err(w, a.truncate(k).to_tensor() if k else 0 * w, x) / total) < 1e-10
        assert abs(float(f.curve[k]) - _out_err(w, f.truncate(k).to_tensor() if k else 0 * w, x) / total) < 1e-10
    curve = output_error_curve(w, gram)
    assert curve[0] == 1.0 and float(curve[-1]) < 1e-20 and bool((curve[1:] <= curve[:-1] + 1e-15).all())
    assert torch.allclose(output_error_curve(w, gram, "asvd", scale), a.curve)
    assert torch.allclose(output_error_curve(w, gram, "fwsvd", row_weights=rows), f.curve)
    # ASVD's exponent reaches the curve (it was fixed at 0.5 before)
    assert torch.allclose(output_error_curve(w, gram, "asvd", scale, alpha=1.0),
                          asvd(w, scale, alpha=1.0, gram=gram).curve)
    assert not torch.allclose(output_error_curve(w, gram, "asvd", scale, alpha=1.0), a.curve)


def test_factors_multiply_back_and_fwsvd_weights_rows():
    x, w = _data(seed=5)
    res = whitened_svd(w.float(), (x.T @ x).float(), 6)
    up, down = res.factors()
    assert torch.allclose(up @ down, res.to_tensor(), atol=1e-10)
    # a heavily weighted row is reproduced almost exactly by the row-weighted SVD
    rows = torch.ones(w.shape[0], dtype=torch.float64)
    rows[3] = 1e4
    fw = row_weighted_svd(w, rows, 2).to_tensor()
    plain = svd(w, 2, method="full").to_tensor()
    assert float((fw[3] - w[3]).norm()) < 1e-3 * float((plain[3] - w[3]).norm())


def test_input_checks():
    _, w = _data()
    with pytest.raises(ValueError, match="gram must be"):
        whitened_svd(w, torch.eye(5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="rank"):
        whitened_svd(w, torch.eye(w.shape[1], dtype=torch.float64), 99)
    with pytest.raises(ValueError, match="scale must be"):
        asvd(w, torch.ones(3), 2)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        whitening_factor(-torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method"):
        output_error_curve(w, torch.eye(w.shape[1], dtype=torch.float64), "fisher")
    with pytest.raises(ValueError, match="needs row_weights"):
        output_error_curve(w, torch.eye(w.shape[1], dtype=torch.float64), "fwsvd")


@pytest.mark.parametrize("bias", [False, True])
def test_refit_reduced_rank_regression_is_the_same_mechanism(bias):
    """reconstruct's refit (tensorslim.reconstruct, asymmetric RRR with ridge) == OLS + the
    whitened SVD here; with a free bias, == the same on centred statistics."""
    from tensorslim.reconstruct import _Stats

    x, w = _data(seed=6)
    x = x + 5.0
    y = x @ w.T + torch.randn(x.shape[0], w.shape[0], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
    st = _Stats(1, x.shape[1], y.shape[1], bias, torch.device("cpu"))
    st.add(x, y)
    ref = st.solve(1e-4 if not bias else 0.0, 5)[0]
    if not bias:
        got = reduced_rank_regression(x.T @ x, x.T @ y, 5, ridge=1e-4)
        assert float((got - ref).abs().max()) < 1e-8 * float(ref.abs().max())
        return
    xc, yc = x - x.mean(0), y - y.mean(0)
    slopes = reduced_rank_regression(xc.T @ xc, xc.T @ yc, 5)
    intercept = y.mean(0) - x.mean(0) @ slopes
    fit_ref = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1) @ ref
    fit = x @ slopes + intercept
    assert float((fit - fit_ref).abs().max()) < 1e-8 * float(fit_ref.abs().max())

"""Truncated SVD (exact or randomized) with deterministic signs.

``svd(M, r)`` returns the best rank-``r`` approximation ``U diag(S) Vh`` (Eckart-Young) of an
(m, n) matrix. ``method="randomized"`` uses the Halko-Martinsson-Tropp range finder with power
iterations, much faster when ``r << min(m, n)``; ``"auto"`` picks it for big matrices only.
Signs are fixed so that the largest-magnitude entry of every column of ``U`` is positive, so the
same input always gives identical factors.
"""
from __future__ import annotations

import torch

from ._common import (check_choice, check_int, check_rank, check_tensor, fix_signs, make_generator,
                      small_linalg_threads)
from .results import SVDResult

__all__ = ["svd"]

_METHODS = ("auto", "full", "randomized")


def svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    n_oversamples: int = 10,
    n_power_iter: int = 2,
    seed: int = 0,
) -> SVDResult:
    """Rank-``rank`` truncated SVD of ``matrix`` (m, n).

    Returns :class:`SVDResult` with ``U`` (m, r), ``S`` (r,) descending, ``Vh`` (r, n) and
    ``errors = (||M - U diag(S) Vh|| / ||M||,)``.

    ``method``: ``"full"`` (LAPACK SVD, exact), ``"randomized"`` (range finder with
    ``rank + n_oversamples`` Gaussian probes and ``n_power_iter`` power iterations, seeded by
    ``seed``) or ``"auto"`` (randomized when min(m, n) >= 512, m*n >= 2**20 and
    ``4 * (rank + n_oversamples) <= min(m, n)``, else full).
    Raises ValueError for NaN/Inf entries or a rank above min(m, n).
    """
    check_tensor(matrix, "matrix", finite=True)
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D (m, n), got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    rank = check_rank(rank, "rank", min(m, n),
                      f"min(m, n)={min(m, n)} for a matrix of shape ({m}, {n})")
    method = check_choice(method, "method", _METHODS)
    n_oversamples = check_int(n_oversamples, "n_oversamples", minimum=0)
    n_power_iter = check_int(n_power_iter, "n_power_iter", minimum=0)
    if method == "auto":
        big = min(m, n) >= 512 and m * n >= 2**20
        method = "randomized" if big and 4 * (rank + n_oversamples) <= min(m, n) else "full"
    k = min(m, n) if method == "full" else min(rank + n_oversamples, m, n)
    with small_linalg_threads(m * n * k, matrix.device):
        if method == "full":
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:
            u, s, vh = _randomized_svd(matrix, rank, n_oversamples, n_power_iter, seed)
        signs = fix_signs(u)
        u, vh = u * signs, vh * signs[:, None]
        return SVDResult(U=u, S=s, Vh=vh, errors=(_svd_error(matrix, u, s, vh),))


def _randomized_svd(
    a: torch.Tensor, rank: int, n_oversamples: int, n_power_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. (2011) Alg. 4.4 + 5.1: ``Q = orth((A A^T)^q A Omega)``, SVD of ``Q^T A``."""
    m, n = a.shape
    k = min(rank + n_oversamples, min(m, n))
    gen = make_generator(seed)
    omega = torch.randn(n, k, generator=gen, dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(n_power_iter):
        q = torch.linalg.qr(a.transpose(0, 1) @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.transpose(0, 1) @ a, full_matrices=False)
    return q @ ub[:, :rank], s[:rank], vh[:rank]


def _svd_error(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """||A - U S Vh|| / ||A|| from ||A||^2 - ||S||^2 (an orthogonal projection), or directly
    when that difference is too small to trust in the working precision."""
    norm_sq = float(torch.linalg.vector_norm(a, dtype=torch.float64) ** 2)
    if norm_sq == 0.0:
        return 0.0
    resid_sq = norm_sq - float((s.to(torch.float64) ** 2).sum())
    if resid_sq > 1e4 * torch.finfo(a.dtype).eps * norm_sq:
        return (resid_sq / norm_sq) ** 0.5
    return float(torch.linalg.vector_norm(a - (u * s) @ vh, dtype=torch.float64)
                 / norm_sq ** 0.5)


def leading_left_vectors(mat: torch.Tensor, k: int) -> torch.Tensor:
    """Leading ``k`` left singular vectors (m, k) of ``mat`` (m, n), deterministic signs.

    For a wide or square matrix (n >= m) this uses the eigendecomposition of the Gram
    ``mat @ mat.T`` (m, m) instead of an SVD of ``mat``: cheaper, the more so the wider the
    matrix (a conv-kernel unfolding has n ~ 9 m), at the price of resolving singular values
    below ~sqrt(eps) * s_1 less accurately, which does not matter for a leading subspace. Tall matrices use a thin SVD.
    ``k`` must be <= m; when ``mat`` has fewer than ``k`` columns the result is completed to
    ``k`` orthonormal columns (deterministically).
    """
    m, n = mat.shape
    if n >= m:
        _, vecs = torch.linalg.eigh(mat @ mat.transpose(0, 1))  # ascending eigenvalues
        u = vecs[:, m - k:].flip(1)
    else:
        u = torch.linalg.svd(mat, full_matrices=False)[0][:, :k]
    if u.shape[1] < k:
        extra = torch.randn(m, k - u.shape[1], generator=make_generator(0), dtype=u.dtype)
        u = torch.linalg.qr(torch.cat([u, extra.to(u.device)], dim=1)).Q
    return u * fix_signs(u)

"""Maximum-volume row selection (Goreinov & Tyrtyshnikov 2001; Mikhalev & Oseledets 2018).

``maxvol(A)`` finds r rows of a tall (n, r) matrix whose r x r submatrix is *dominant*: every
coefficient of ``A @ inv(A[rows])`` is at most ``tol`` in modulus, which bounds its volume
(|det|) from below by ``max volume / (tol * sqrt(r))**r`` (Hadamard's inequality applied to the
coefficients of any other r rows). ``rect_maxvol(A, P)`` then greedily adds rows up to ``P >= r``,
each time the row with the largest coefficient norm in ``A @ pinv(A[rows])`` (rectangular
maxvol), with Sherman-Morrison updates of the coefficients. A port of the algorithms of the
PyPI package ``maxvolpy`` to torch; deterministic (no random choices; ties pick the lowest
index).
"""
from __future__ import annotations

import torch

from ._common import check_tensor

__all__ = ["maxvol", "rect_maxvol"]


def _check_tall(A: object, name: str) -> torch.Tensor:
    A = check_tensor(A, name, finite=True)
    if A.dim() != 2 or A.shape[1] < 1 or A.shape[0] < A.shape[1]:
        raise ValueError(f"{name} must be a tall (n, r) matrix with n >= r >= 1, got shape "
                         f"{tuple(A.shape)}")
    return A


def _lu_rows(A: torch.Tensor) -> torch.Tensor:
    """The r rows LU with partial pivoting picks (the starting guess of maxvol)."""
    n, r = A.shape
    _, pivots, _ = torch.linalg.lu_factor_ex(A)  # singular A is reported by the solve below
    perm = list(range(n))
    for i, p in enumerate(pivots.tolist()[:r]):  # sequential swaps, 1-based
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm[:r], dtype=torch.long)


def _coefficients(A: torch.Tensor, rows: torch.Tensor, name: str) -> torch.Tensor:
    """``A @ inv(A[rows])`` (n, r); ValueError when that submatrix is singular."""
    sub = A[rows]
    try:
        return torch.linalg.solve(sub.T, A.T).T
    except RuntimeError:
        raise ValueError(f"{name}: the matrix has rank < {A.shape[1]} (a singular {A.shape[1]} x "
                         f"{A.shape[1]} submatrix); maxvol needs full column rank") from None


def maxvol(A: torch.Tensor, tol: float = 1.05, max_iters: int = 100) -> torch.Tensor:
    """Row indices (r,) int64 of a dominant r x r submatrix of ``A`` (n, r), n >= r.

    Starts from the rows of LU with partial pivoting and swaps in the row holding the
    largest coefficient of ``B = A @ inv(A[rows])`` while it exceeds ``tol`` (>= 1), at most
    ``max_iters`` swaps (each multiplies the volume by more than ``tol``). On return every
    ``|B_ij| <= tol`` unless the swap budget ran out. ``A`` must have full column rank.
    """
    A = _check_tall(A, "maxvol: A")
    if not isinstance(tol, (int, float)) or not tol >= 1.0:
        raise ValueError(f"maxvol: tol must be a number >= 1, got {tol!r}")
    if not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"maxvol: max_iters must be an int >= 0, got {max_iters!r}")
    rows = _lu_rows(A)
    B = _coefficients(A, rows, "maxvol")
    for _ in range(max_iters):
        flat = int(torch.argmax(B.abs()))  # first maximum: lowest (row, column)
        i, j = divmod(flat, B.shape[1])
        if abs(float(B[i, j])) <= tol:
            break
        # swap row i in for rows[j]: B <- B - B[:, j] (B[i] - e_j) / B[i, j]
        y = B[i].clone()
        y[j] -= 1.0
        B = B - torch.outer(B[:, j], y / B[i, j])
        rows[j] = i
    return rows


def rect_maxvol(A: torch.Tensor, P: int, *, tol: float = 1.05, max_iters: int = 100
                ) -> torch.Tensor:
    """Row indices (P,) int64 of ``A`` (n, r) for a rectangular P x r submatrix of large
    volume, r <= P <= n: :func:`maxvol` rows (``tol``, ``max_iters``) first, then the row of
    largest ``||C_i||`` with ``C = A @ pinv(A[rows])`` is added until there are ``P``.

    The selected rows come first in the order maxvol returns them, then in the order they
    were added. ``C`` is updated by Sherman-Morrison (n * P * r work in all), never recomputed.
    """
    A = _check_tall(A, "rect_maxvol: A")
    n, r = A.shape
    if isinstance(P, bool) or not isinstance(P, int) or not r <= P <= n:
        raise ValueError(f"rect_maxvol: P must be an int with r={r} <= P <= n={n}, got {P!r}")
    rows = maxvol(A, tol=tol, max_iters=max_iters)
    C = A.new_zeros(n, P)  # C[:, :K] (n, K): A ~= C[:, :K] @ A[rows], updated in place
    C[:, :r] = _coefficients(A, rows, "rect_maxvol")
    norms = (C[:, :r] * C[:, :r]).sum(1)
    norms[rows] = -1.0  # selected rows are never picked again
    picked = rows.tolist()
    for K in range(r, P):
        i = int(torch.argmax(norms))
        c = C[i, :K].clone()
        t = C[:, :K] @ c  # (n,)
        lam = 1.0 / (1.0 + float(t[i]))
        # pinv of the grown submatrix: old coefficients lose their part along c, new column
        C[:, :K].addr_(t, c, alpha=-lam)
        C[:, K] = lam * t
        norms.sub_(lam * t * t)
        norms[i] = -1.0  # picked rows only go further below 0: never picked again
        picked.append(i)
    return torch.tensor(picked, dtype=torch.long)

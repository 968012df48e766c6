"""Tensor-Train decomposition (Oseledets 2011, TT-SVD) and TT-matrices (Novikov et al. 2015).

``tt_svd`` sweeps left to right: reshape the remainder to (r_{k-1} I_k, rest), truncated SVD,
keep ``U`` as core k, carry ``S Vh`` on. Truncation is by maximum ranks, by relative accuracy
``eps`` (each step drops at most ``delta = eps / sqrt(d - 1) * ||X||`` so that
``||X - X^|| <= eps ||X||``), or both (the smaller rank wins). Cores are left-orthonormal, so the
squared error is exactly the sum of the dropped squared singular values.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from ._common import check_int, check_tensor, check_tol, fix_signs, small_linalg_threads
from .results import TTMatrix, TTTensor

__all__ = ["tt_svd", "tt_matrix"]


def tt_svd(
    t: torch.Tensor,
    ranks: int | Sequence[int] | None = None,
    *,
    eps: float | None = None,
) -> TTTensor:
    """TT-SVD of ``t`` (I_1, ..., I_d).

    ``ranks``: maximum TT ranks, an int (all bonds) or ``d - 1`` ints (r_1..r_{d-1}); a bond is
    also capped by what its unfolding allows. ``eps``: relative accuracy, ``||X - X^|| <= eps
    ||X||``. With neither, the decomposition is exact (full ranks). Returns :class:`TTTensor`
    with cores (r_{k-1}, I_k, r_k) and ``errors = (||X - X^|| / ||X||,)``.
    Raises ValueError for NaN/Inf entries or an empty tensor.
    """
    check_tensor(t, "t", min_dim=1, finite=True)
    d = t.dim()
    max_ranks = _check_tt_ranks(ranks, d)
    if eps is not None:
        eps = check_tol(eps, "eps")
    shape = tuple(int(s) for s in t.shape)
    if 0 in shape:
        raise ValueError(f"t must not be empty, got shape {shape}")
    # the SVD of unfolding k costs at most numel * min(rows, columns)
    work = max((t.numel() * min(prod(shape[:k + 1]), prod(shape[k + 1:])) for k in range(d - 1)),
               default=0)
    with small_linalg_threads(work, t.device):
        return _tt_svd(t, shape, max_ranks, eps)


def _tt_svd(t: torch.Tensor, shape: tuple[int, ...], max_ranks: tuple[int, ...] | None,
            eps: float | None) -> TTTensor:
    """:func:`tt_svd` on validated arguments."""
    d = len(shape)
    norm_sq = float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)
    delta_sq = (eps * eps / max(d - 1, 1)) * norm_sq if eps is not None else 0.0
    cores, dropped_sq, rest, r_prev = [], 0.0, t, 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * shape[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        s64 = s.to(torch.float64) ** 2
        # tail[i] = sum of s_j^2 for j >= i; keep the fewest values whose dropped tail <= delta^2.
        tail = torch.flip(torch.cumsum(torch.flip(s64, [0]), 0), [0])
        r = len(s) if eps is None else max(1, int((tail > delta_sq).sum()))
        if max_ranks is not None:
            r = min(r, max_ranks[k])
        dropped_sq += float(tail[r]) if r < len(s) else 0.0
        u, s, vh = u[:, :r], s[:r], vh[:r]
        signs = fix_signs(u)
        cores.append((u * signs).reshape(r_prev, shape[k], r))
        rest = (s * signs)[:, None] * vh
        r_prev = r
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    err = (dropped_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    return TTTensor(cores=tuple(cores), errors=(err,))


def tt_matrix(
    w: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    *,
    eps: float | None = None,
) -> TTMatrix:
    """TT-matrix of ``w`` (M, N) with ``M = prod(out_modes)``, ``N = prod(in_modes)``.

    ``w`` is reshaped to ``out_modes + in_modes``, permuted to (m_1, n_1, m_2, n_2, ...), each
    pair merged, TT-SVD'd (``ranks``/``eps`` as in :func:`tt_svd`, d - 1 bonds) and the cores
    reshaped to (r_{k-1}, m_k, n_k, r_k). ``TTMatrix.to_tensor()`` gives back (M, N).
    """
    check_tensor(w, "w", finite=True)
    if w.dim() != 2:
        raise ValueError(f"w must be a matrix (M, N), got shape {tuple(w.shape)}")
    in_modes = _check_modes(in_modes, "in_modes")
    out_modes = _check_modes(out_modes, "out_modes")
    if len(in_modes) != len(out_modes):
        raise ValueError(f"in_modes {in_modes} and out_modes {out_modes} must have the same "
                         "length (one pair per TT core)")
    m, n = w.shape
    if prod(out_modes) != m or prod(in_modes) != n:
        raise ValueError(f"w of shape ({m}, {n}) does not match out_modes {out_modes} "
                         f"(product {prod(out_modes)}, must equal M={m}) and in_modes "
                         f"{in_modes} (product {prod(in_modes)}, must equal N={n})")
    d = len(in_modes)
    perm = [i for k in range(d) for i in (k, d + k)]
    t = w.reshape(out_modes + in_modes).permute(perm)
    t = t.reshape([out_modes[k] * in_modes[k] for k in range(d)])
    tt = tt_svd(t, ranks, eps=eps)
    cores = tuple(c.reshape(c.shape[0], out_modes[k], in_modes[k], c.shape[2])
                  for k, c in enumerate(tt.cores))
    return TTMatrix(cores=cores, in_modes=in_modes, out_modes=out_modes, errors=tt.errors)


def _check_tt_ranks(ranks: int | Sequence[int] | None, d: int) -> tuple[int, ...] | None:
    if ranks is None:
        return None
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        return (check_int(ranks, "ranks"),) * (d - 1)
    if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be None, an int or a sequence of ints, got {ranks!r}")
    if len(ranks) != d - 1:
        raise ValueError(f"ranks={tuple(ranks)} must have d - 1 = {d - 1} entries (one per bond "
                         f"of a {d}-way tensor), got {len(ranks)}")
    return tuple(check_int(r, f"ranks[{i}]") for i, r in enumerate(ranks))


def _check_modes(modes: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(modes, (int, str)) or not isinstance(modes, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {modes!r}")
    if not modes:
        raise ValueError(f"{name} must name at least one mode, got an empty sequence")
    return tuple(check_int(x, f"{name} entry") for x in modes)

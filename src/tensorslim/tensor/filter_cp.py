"""Filter-wise CP (NORTON, Pham, Zniyed & Nguyen 2024) and principal angles between subspaces.

:func:`filter_cp` decomposes MANY small 3-way tensors at once: all C_out filters W_o
(C_in x kh x kw) of a conv layer, ``W_o ~= sum_r a_or o b_or o c_or``, by one vectorised
alternating-least-squares loop whose every step is a batched einsum / batched R x R solve
over the filters (no Python loop over filters). The initialisation is each filter's own
leading singular vectors (HOSVD), so identical filters get identical factors.

:func:`coupled_filter_cp` (CONCATENATION's coupled CPD) shares the channel factor A within
each cluster of filters: ``W_o ~= [[A_k(o), B_o, C_o]]``.

:func:`principal_angles` follows ``scipy.linalg.subspace_angles`` (same values and order);
:func:`filter_distances` is NORTON's ``D = alpha D^A + beta D^B + gamma D^C`` where
``D^X_ij`` is the largest principal angle between the column spaces of X_i and X_j.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

import torch

from ._common import check_int, check_tensor, check_tol, make_generator

__all__ = ["FilterCP", "filter_cp", "coupled_filter_cp", "principal_angles", "filter_distances"]


@dataclass(frozen=True, eq=False)
class FilterCP:
    """CPs of N small 3-way tensors (I, J, K).

    ``weights`` (N, R); ``factors`` = (A (N, I, R), B (N, J, R), C (N, K, R)) with unit-norm
    columns; ``errors`` (N,) relative error ||X_n - X^_n|| / ||X_n|| per tensor; ``sweeps``:
    ALS sweeps run. With a coupled CP, A[n] is the same for every n of one cluster.
    """

    weights: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    errors: torch.Tensor
    sweeps: int = 0

    @property
    def rank(self) -> int:
        return int(self.weights.shape[1])

    def to_tensor(self) -> torch.Tensor:
        """The N reconstructed tensors (N, I, J, K)."""
        a, b, c = self.factors
        return torch.einsum("nir,njr,nkr->nijk", a * self.weights[:, None, :], b, c)


def max_filter_rank(shape: Sequence[int]) -> int:
    """Generic CP-rank bound of one (I, J, K) tensor: min over modes of the other dims' product."""
    return min(prod(shape) // s for s in shape)


def _check_input(x: object, rank: object, n_iter: object, tol: object) -> tuple[torch.Tensor, int]:
    check_tensor(x, "x", finite=True)
    if x.dim() != 4 or 0 in x.shape:
        raise ValueError(f"x must be a non-empty (N, I, J, K) stack of 3-way tensors, got shape "
                         f"{tuple(x.shape)}")
    rank = check_int(rank, "rank")
    bound = max_filter_rank(x.shape[1:])
    if rank > bound:
        raise ValueError(f"rank={rank} exceeds the generic CP rank {bound} of a "
                         f"{tuple(x.shape[1:])} tensor; accepted: 1 <= rank <= {bound}")
    check_int(n_iter, "n_iter")
    check_tol(tol)
    return x, rank


def _exact(x: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """An exact CP at rank >= the generic bound: the two modes with the smallest product get
    unit vectors (one column per index pair), the third holds the fibres; extra columns 0."""
    n, dims = x.shape[0], list(x.shape[1:])
    keep = max(range(3), key=lambda m: dims[m])  # the fibre mode: the others' product is least
    p, q = [m for m in range(3) if m != keep]
    fib = x.movedim(keep + 1, -1).reshape(n, dims[p] * dims[q], dims[keep])  # (N, P*Q, K)
    out = [x.new_zeros(n, d, rank) for d in dims]
    cols = dims[p] * dims[q]
    idx = torch.arange(cols, device=x.device)
    out[p][:, idx // dims[q], idx] = 1.0
    out[q][:, idx % dims[q], idx] = 1.0
    out[keep][:, :, :cols] = fib.transpose(1, 2)
    return out


def _init(x: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Each tensor's leading left singular vectors per mode (HOSVD), random columns where a
    mode is smaller than ``rank`` (the same draws for every tensor)."""
    n = x.shape[0]
    out = []
    for m in range(3):
        unf = x.movedim(m + 1, 1).reshape(n, x.shape[m + 1], -1)
        u = torch.linalg.svd(unf, full_matrices=False).U[:, :, :rank]
        if u.shape[2] < rank:
            extra = torch.randn(x.shape[m + 1], rank - u.shape[2], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(u).expand(n, -1, -1)], dim=2)
        out.append(u)
    return out


def _solve(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``m @ inv(v)`` for symmetric PSD (.., R, R) ``v`` (see :func:`_inv`)."""
    return m @ _inv(v)


def _inv(v: torch.Tensor) -> torch.Tensor:
    """Batched inverse of symmetric PSD (.., R, R) ``v``: Gauss-Jordan vectorised over
    the batch (R steps of elementwise ops; LAPACK's per-matrix calls cost more than the math
    for R x R systems this small). A tiny relative ridge keeps singular systems (a rank above
    what a tensor supports) finite."""
    r = v.shape[-1]
    eye = torch.eye(r, dtype=v.dtype, device=v.device)
    ridge = 1e-12 * v.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    a = v + ridge[..., None, None] * eye
    inv = eye.expand_as(a).clone()
    for j in range(r):
        piv = a[..., j, j].clamp_min(1e-300)[..., None]
        row_a, row_i = a[..., j, :] / piv, inv[..., j, :] / piv
        f = a[..., :, j].clone()
        f[..., j] = 0.0
        a = a - f[..., :, None] * row_a[..., None, :]
        inv = inv - f[..., :, None] * row_i[..., None, :]
        a[..., j, :], inv[..., j, :] = row_a, row_i
    return inv


_MTTKRP = ("nijk,njr,nkr->nir", "nijk,nir,nkr->njr", "nijk,nir,njr->nkr")


def _gram(f: torch.Tensor) -> torch.Tensor:
    return f.transpose(1, 2) @ f


def _errors(x: torch.Tensor, f: list[torch.Tensor], norm_sq: torch.Tensor) -> torch.Tensor:
    fit = torch.einsum("nijk,nir,njr,nkr->n", x, *f)
    model = (_gram(f[0]) * _gram(f[1]) * _gram(f[2])).sum((1, 2))
    err = (norm_sq - 2 * fit + model).clamp_min(0)
    return (err / norm_sq.clamp_min(1e-300)).sqrt()


def _finish(x: torch.Tensor, f: list[torch.Tensor], sweeps: int, sort: bool = True) -> FilterCP:
    norms = [g.norm(dim=1) for g in f]  # (N, R) each
    w = norms[0] * norms[1] * norms[2]
    unit = [g / n.clamp_min(1e-300)[:, None, :] for g, n in zip(f, norms)]
    err = (x - torch.einsum("nir,njr,nkr->nijk", unit[0] * w[:, None, :], unit[1], unit[2]))
    nx = x.flatten(1).norm(dim=1)
    errors = err.flatten(1).norm(dim=1) / nx.clamp_min(1e-300)
    if sort:  # weights descending per tensor
        order = torch.sort(-w, dim=1, stable=True).indices
        w = w.gather(1, order)
        unit = [g.gather(2, order[:, None, :].expand_as(g)) for g in unit]
    return FilterCP(w, tuple(unit), errors, sweeps)


def _als(x: torch.Tensor, f: list[torch.Tensor], n_iter: int, tol: float
         ) -> tuple[list[torch.Tensor], int]:
    """Batched CP-ALS sweeps from the factors ``f`` (N, dim, R) of the stack ``x`` (N, I, J, K).

    The factors are kept transposed, (N, R, dim), throughout: every product then has the R
    rows on the left ((N, R, *) @ (N, *, I)), a shape batched GEMM runs several times faster
    than (N, I, *) @ (N, *, R) when R is tiny. Each factor's Gram is computed once, after its
    own update, and the R x R normal equations are solved by :func:`_inv`.
    """
    n, i, j, k = x.shape
    x0 = x.reshape(n, i, j * k)  # mode-0 unfolding
    x0t = x0.transpose(1, 2).contiguous()  # (N, J*K, I)
    norm_sq = x.flatten(1).pow(2).sum(1)
    at, bt, ct = (g.transpose(1, 2).contiguous() for g in f)
    gb, gc = _gram_t(bt), _gram_t(ct)
    prev, sweeps = None, 0
    for sweeps in range(1, n_iter + 1):
        krt = (bt[:, :, :, None] * ct[:, :, None, :]).reshape(n, -1, j * k)  # (N, R, J*K)
        at = (_inv(gb * gc) @ krt) @ x0t  # MTTKRP and solve: (N, R, I)
        ga = _gram_t(at)
        t = (at @ x0).reshape(n, -1, j, k)  # X contracted with A over the channels
        bt = _inv(ga * gc) @ (t * ct[:, :, None, :]).sum(3)
        gb = _gram_t(bt)
        mk = (t * bt[:, :, :, None]).sum(2)  # last mode's MTTKRP, transposed (N, R, K)
        ct = _inv(ga * gb) @ mk
        gc = _gram_t(ct)
        fit = (ct * mk).sum((1, 2))
        err = ((norm_sq - 2 * fit + (ga * gb * gc).sum((1, 2))).clamp_min(0)
               / norm_sq.clamp_min(1e-300)).sqrt()
        if prev is not None and float(((prev - err).abs() / prev.clamp_min(1e-300)).max()) <= tol:
            break
        prev = err
    return [g.transpose(1, 2) for g in (at, bt, ct)], sweeps


def _gram_t(ft: torch.Tensor) -> torch.Tensor:
    """Gram of transposed factors (N, R, dim): (N, R, R)."""
    return ft @ ft.transpose(1, 2)


def filter_cp(x: torch.Tensor, rank: int, *, n_iter: int = 300, tol: float = 1e-9,
              seed: int = 0) -> FilterCP:
    """Rank-``rank`` CP of every tensor of the stack ``x`` (N, I, J, K) (conv filters
    (C_out, C_in, kh, kw)), all N at once by batched ALS; float32 or float64 (computed in
    float64, returned in ``x``'s dtype).

    At or above the generic rank bound ``min(IJ, IK, JK)`` the exact CP is built directly.
    Otherwise ALS starts from each tensor's HOSVD and stops after ``n_iter`` sweeps or when
    the largest relative change of the N errors is below ``tol``. Same ``seed`` -> same result.
    Raises ValueError for a wrong shape, NaN/Inf entries or a rank out of range.
    """
    x, rank = _check_input(x, rank, n_iter, tol)
    gen = make_generator(seed)
    xd = x.detach().to(torch.float64)
    if rank >= max_filter_rank(x.shape[1:]):
        out = _finish(xd, _exact(xd, rank), 0)
    else:
        factors, sweeps = _als(xd, _init(xd, rank, gen), n_iter, tol)
        out = _finish(xd, factors, sweeps)
    dt = x.dtype
    return FilterCP(out.weights.to(dt), tuple(g.to(dt) for g in out.factors), out.errors, out.sweeps)


def coupled_filter_cp(x: torch.Tensor, rank: int, clusters: torch.Tensor, *, n_iter: int = 300,
                      tol: float = 1e-9, seed: int = 0) -> FilterCP:
    """Coupled CP (CONCATENATION): every tensor n of cluster ``clusters[n]`` shares one channel
    factor A_k (I, R), ``X_n ~= [[A_k, B_n, C_n]]``, fitted by batched ALS minimising
    ``sum_n ||X_n - [[A_k(n), B_n, C_n]]||^2``. ``clusters``: (N,) ints in [0, K) (every value
    used). Starts from :func:`filter_cp` (A_k = the cluster's first member's A). Returns a
    :class:`FilterCP` whose ``factors[0][n]`` is A_k(n) (up to per-tensor column scaling).
    """
    x, rank = _check_input(x, rank, n_iter, tol)
    if not isinstance(clusters, torch.Tensor) or clusters.dtype not in (torch.int32, torch.int64) \
            or tuple(clusters.shape) != (x.shape[0],):
        raise TypeError(f"clusters must be an int tensor of shape ({x.shape[0]},), got "
                        f"{clusters!r:.80}")
    k = int(clusters.max()) + 1
    if int(clusters.min()) < 0 or torch.unique(clusters).numel() != k:
        raise ValueError(f"clusters must use every value 0..K-1 (K={k}), got "
                         f"{sorted(set(clusters.tolist()))[:10]}")
    start = filter_cp(x.detach().to(torch.float64), rank, n_iter=min(n_iter, 50), tol=tol, seed=seed)
    xd = x.detach().to(torch.float64)
    cl = clusters.to(xd.device).long()
    first = torch.full((k,), -1, dtype=torch.long)
    for n in reversed(range(x.shape[0])):
        first[int(cl[n])] = n
    a = start.factors[0][first]  # (K, I, R)
    b = start.factors[1] * start.weights[:, None, :]
    c = start.factors[2].clone()
    norm_sq = xd.flatten(1).pow(2).sum(1)
    prev, sweeps = None, 0
    for sweeps in range(1, n_iter + 1):
        an = a[cl]
        b = _solve(torch.einsum(_MTTKRP[1], xd, an, c), _gram(an) * _gram(c))
        c = _solve(torch.einsum(_MTTKRP[2], xd, an, b), _gram(an) * _gram(b))
        m = torch.zeros_like(a).index_add_(0, cl, torch.einsum(_MTTKRP[0], xd, b, c))
        v = torch.zeros(k, rank, rank, dtype=xd.dtype).index_add_(0, cl, _gram(b) * _gram(c))
        a = _solve(m, v)
        err = _errors(xd, [a[cl], b, c], norm_sq)
        total = float(err.pow(2).mul(norm_sq).sum())
        if prev is not None and abs(prev - total) <= tol * max(prev, 1e-300):
            break
        prev = total
    out = _finish(xd, [a[cl], b, c], sweeps, sort=False)  # columns shared per cluster
    dt = x.dtype
    return FilterCP(out.weights.to(dt), tuple(g.to(dt) for g in out.factors), out.errors, out.sweeps)


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, descending, as ``scipy.linalg.subspace_angles``) between the
    column spaces of ``a`` (..., M, P) and ``b`` (..., M, Q), one per dimension of the smaller
    subspace: (..., min(P, Q)). Leading dims are a batch. Columns are assumed linearly
    independent (an orthonormal basis is taken by thin SVD). Small angles are computed from
    sines, large ones from cosines (full precision for both)."""
    check_tensor(a, "a", min_dim=2, finite=True)
    check_tensor(b, "b", min_dim=2, finite=True)
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(f"a and b must have the same number of rows, got shapes {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    qa = torch.linalg.svd(a, full_matrices=False).U
    qb = torch.linalg.svd(b, full_matrices=False).U
    if qa.shape[-1] < qb.shape[-1]:
        qa, qb = qb, qa
    m = qa.transpose(-1, -2) @ qb
    sigma = torch.linalg.svdvals(m)  # descending cosines -> ascending angles
    sines = torch.linalg.svdvals(qb - qa @ m)  # descending sines -> descending angles
    from_cos = torch.arccos(sigma.flip(-1).clamp(-1.0, 1.0))
    from_sin = torch.arcsin(sines.clamp(-1.0, 1.0))
    return torch.where(sigma.flip(-1) ** 2 >= 0.5, from_sin, from_cos)


def _largest_angles(q: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, N) largest principal angle between the spans of orthonormal q[i], q[j] (N, M, R)."""
    n = q.shape[0]
    out = torch.empty(n, n, dtype=q.dtype)
    for s in range(0, n, chunk):
        m = torch.einsum("amr,bms->abrs", q[s:s + chunk], q)
        cos_min = torch.linalg.svdvals(m)[..., -1].clamp(0.0, 1.0)
        out[s:s + chunk] = torch.arccos(cos_min)
    return out


def filter_distances(cp: FilterCP, weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3), *,
                     chunk: int = 64) -> torch.Tensor:
    """NORTON's filter distance matrix (N, N): ``D = alpha D^A + beta D^B + gamma D^C`` with
    ``(alpha, beta, gamma) = weights`` over the factors (channel, height, width) of ``cp``
    and ``D^X_ij`` the largest principal angle between span(X_i) and span(X_j) (0 for
    identical subspaces, pi/2 for orthogonal ones); diagonal 0, symmetric. ``chunk`` rows
    of pairs are formed at a time (memory chunk * N * R^2)."""
    if not isinstance(cp, FilterCP):
        raise TypeError(f"cp must be a FilterCP (from filter_cp), got {type(cp).__name__}")
    if len(weights) != 3 or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
        raise ValueError(f"weights must be three non-negative numbers (alpha, beta, gamma), got "
                         f"{weights!r}")
    d = None
    for w, f in zip(weights, cp.factors):
        if w == 0:
            continue
        q = torch.linalg.qr(f.to(torch.float64)).Q
        part = float(w) * _largest_angles(q, chunk)
        d = part if d is None else d + part
    if d is None:
        d = torch.zeros(cp.weights.shape[0], cp.weights.shape[0], dtype=torch.float64)
    d = (d + d.T) / 2
    d.fill_diagonal_(0.0)
    return d

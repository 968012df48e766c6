"""The learning-compression (LC) rank step in closed form (Idelbayev & Carreira-Perpinan,
CVPR 2020), for matrices (SVD) and Tucker-2 kernels (LTC, Hao et al. 2022).

The C-step of LC chooses, per layer, the rank ``r`` that minimises

    lam * C(r) + mu / 2 * ||W - Pi_r(W)||^2

where ``Pi_r`` is the projection onto rank ``r`` and ``C(r)`` the cost (params or MACs) of
the layer factorized at ``r``. Both terms are known for every candidate rank from one
decomposition, so the minimum is found by evaluating all of them:

- matrix ``W`` (m, n), singular values ``s``: ``||W - Pi_r(W)||^2 = sum_{i > r} s_i^2``
  (Eckart-Young);
- Tucker-2 kernel ``W`` (T, S, *k) with the seed's projection (Algorithm 1: the leading
  left singular vectors ``A_out`` of the mode-0 unfolding and ``A_in`` of the mode-1
  unfolding, ``Theta = W x_0 A_out A_out^T x_1 A_in A_in^T``): with the full orthonormal
  bases ``U_out``, ``U_in`` and the full core ``G = W x_0 U_out^T x_1 U_in^T``, the map
  ``W -> Theta`` is an orthogonal projection, so
  ``||W - Theta||^2 = ||W||^2 - sum_{i < r_out, j < r_in} E[i, j]``, ``E[i, j] = ||G[i, j]||^2``:
  the error of every pair ``(r_in, r_out)`` from one 2-D cumulative sum. (The seed's own
  Eq. 8-9 are not in its talk; this is the exact error of its projection, chosen jointly
  over the pair.)

A candidate whose cost is not below the dense layer's is never better than leaving the layer
dense (zero error, the dense cost): the functions return ``None`` for "keep dense", which
wins ties, so ``lam = 0`` keeps every layer dense (full rank).

Pure: torch tensors only (no ``torch.nn``, no layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..tensor._common import small_linalg_threads

__all__ = ["matrix_errors", "Tucker2Spectrum", "tucker2_spectrum", "tucker2_errors",
           "tucker2_bound_errors", "lc_objective", "lc_rank", "lc_rank_pair", "bisect_lam",
           "fill_budget"]


def matrix_errors(s: torch.Tensor) -> torch.Tensor:
    """``err[r - 1] = sum_{i >= r} s_i^2``: the squared error of the rank-``r`` truncation for
    r = 1..R, from the singular values ``s`` (R,) in decreasing order (float64)."""
    sq = s.detach().double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,))  # tail[i] = sum_{j >= i}
    return torch.cat([tail[1:], tail.new_zeros(1)])


@dataclass(frozen=True)
class Tucker2Spectrum:
    """The HOSVD of a kernel over its two channel modes.

    ``u_out`` (T, R_out) and ``u_in`` (S, R_in): left singular vectors of the mode-0 and mode-1
    unfoldings, by decreasing singular value; ``energy`` (R_in, R_out):
    ``energy[j, i] = ||(W x_0 u_out^T x_1 u_in^T)[i, j]||^2``; ``norm2`` = ||W||^2."""

    u_out: torch.Tensor
    u_in: torch.Tensor
    energy: torch.Tensor
    norm2: float

    def project(self, w: torch.Tensor, rank: tuple[int, int]) -> torch.Tensor:
        """``w x_0 P_out x_1 P_in`` (same shape and dtype as ``w``) with the leading
        ``rank = (r_in, r_out)`` singular vectors of each mode."""
        a_out = self.u_out[:, :rank[1]].to(w.dtype)
        a_in = self.u_in[:, :rank[0]].to(w.dtype)
        flat = w.reshape(*w.shape[:2], -1)
        core = torch.einsum("ti,tsk,sj->ijk", a_out, flat, a_in)
        return torch.einsum("ti,ijk,sj->tsk", a_out, core, a_in).reshape(w.shape)


def _left_vectors(mat: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of ``mat`` (m, n), by decreasing singular value: the
    eigenvectors of the Gram ``mat mat^T`` (m, m), cheaper than an SVD for a wide unfolding;
    only the first min(m, n) (the rest span a null space)."""
    vals, vecs = torch.linalg.eigh(mat @ mat.t())
    order = torch.argsort(vals, descending=True)[:min(mat.shape)]
    return vecs[:, order]


def tucker2_spectrum(w: torch.Tensor) -> Tucker2Spectrum:
    """The channel-mode HOSVD of a kernel ``w`` (T, S, *k), in float64."""
    w64 = w.detach().double()
    t, s = w64.shape[:2]
    with small_linalg_threads(w64.numel() * max(t, s), w64.device):
        u_out = _left_vectors(w64.reshape(t, -1))
        u_in = _left_vectors(w64.transpose(0, 1).reshape(s, -1))
        core = torch.einsum("ti,tsk,sj->ijk", u_out, w64.reshape(t, s, -1), u_in)
    energy = (core ** 2).sum(-1).t().contiguous()  # (R_in, R_out)
    return Tucker2Spectrum(u_out, u_in, energy, float((w64 ** 2).sum()))


def tucker2_errors(energy: torch.Tensor, norm2: float) -> torch.Tensor:
    """``err[r_in - 1, r_out - 1] = norm2 - sum_{j < r_in, i < r_out} energy[j, i]`` (>= 0)."""
    captured = energy.double().cumsum(0).cumsum(1)
    return (norm2 - captured).clamp_min(0.0)


def tucker2_bound_errors(energy: torch.Tensor, norm2: float) -> torch.Tensor:
    """``err[r_in - 1, r_out - 1] = e_in(r_in) + e_out(r_out)``: the truncated-HOSVD error
    bound (De Lathauwer et al. 2000), the energy of the mode-1 unfolding beyond ``r_in`` plus
    that of the mode-0 unfolding beyond ``r_out`` (both from the full core's ``energy``,
    whose row / column sums are the squared singular values of the two unfoldings). It is at
    least the exact error of :func:`tucker2_errors` and additive in the two ranks."""
    e = energy.double()
    e_in = (norm2 - e.sum(1).cumsum(0)).clamp_min(0.0)  # (R_in,)
    e_out = (norm2 - e.sum(0).cumsum(0)).clamp_min(0.0)  # (R_out,)
    return e_in[:, None] + e_out[None, :]


def lc_objective(cost: torch.Tensor, err: torch.Tensor, lam: float, mu: float) -> torch.Tensor:
    """``lam * cost + mu / 2 * err`` elementwise (float64)."""
    return lam * cost.double() + 0.5 * mu * err.double()


def _check(lam: float, mu: float, cost: torch.Tensor, err: torch.Tensor) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lc: lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
        raise ValueError(f"lc: mu must be a finite number > 0, got {mu!r}")
    if cost.shape != err.shape:
        raise ValueError(f"lc: cost has shape {tuple(cost.shape)} but the errors have "
                         f"{tuple(err.shape)}; give one cost per candidate rank")


def _argmin(cost: torch.Tensor, err: torch.Tensor, lam: float, mu: float,
            dense_cost: float | None) -> int | None:
    """Flat index of the best candidate, or None when keeping the layer dense is at least as
    good (only with ``dense_cost``: candidates costing that much or more are excluded)."""
    obj = lc_objective(cost, err, lam, mu).reshape(-1)
    if dense_cost is not None:
        obj = torch.where(cost.reshape(-1).double() < dense_cost, obj,
                          obj.new_full((), math.inf))
    i = int(torch.argmin(obj))
    if dense_cost is not None and not float(obj[i]) < lam * float(dense_cost):
        return None
    return i


def lc_rank(err: torch.Tensor, cost: torch.Tensor, lam: float, mu: float,
            dense_cost: float | None = None) -> int | None:
    """The rank r in 1..R minimising ``lam * cost[r-1] + mu/2 * err[r-1]`` (``err``: from
    :func:`matrix_errors`), or None when the dense layer (error 0, ``dense_cost``) is at
    least as good. Ties go to the smaller rank."""
    _check(lam, mu, cost, err)
    i = _argmin(cost, err, lam, mu, dense_cost)
    return None if i is None else i + 1


def lc_rank_pair(err: torch.Tensor, cost: torch.Tensor, lam: float, mu: float,
                 dense_cost: float | None = None) -> tuple[int, int] | None:
    """The Tucker-2 pair (r_in, r_out) minimising ``lam * cost + mu/2 * err`` over all
    pairs (``err``, ``cost``: (R_in, R_out), indexed [r_in - 1, r_out - 1]; ``err`` from
    :func:`tucker2_errors`), or None when the dense layer is at least as good."""
    _check(lam, mu, cost, err)
    if err.dim() != 2:
        raise ValueError(f"lc_rank_pair: err must be (R_in, R_out), got shape {tuple(err.shape)}")
    i = _argmin(cost, err, lam, mu, dense_cost)
    return None if i is None else (i // err.shape[1] + 1, i % err.shape[1] + 1)


def bisect_lam(total_cost: Callable[[float], float], target: float, lam_hi: float,
               iters: int = 60) -> tuple[float, float]:
    """The smallest ``lam`` (to a relative precision of about ``lam_hi * 2**-iters`` in log
    scale) with ``total_cost(lam) <= target``, and that cost. ``total_cost`` must be
    non-increasing in ``lam`` (the LC C-step's is: a larger price never buys a costlier
    rank). Searches [lam_hi * 1e-12, lam_hi] in log scale; ValueError when even ``lam_hi``
    misses the target (unreachable)."""
    hi_cost = total_cost(lam_hi)
    if hi_cost > target:
        raise ValueError(f"bisect_lam: the target cost {target:.6g} is unreachable: the smallest "
                         f"ranks cost {hi_cost:.6g}")
    lo = math.log(lam_hi) - 12 * math.log(10)
    hi = math.log(lam_hi)
    best = (lam_hi, hi_cost)
    if total_cost(math.exp(lo)) <= target:
        return math.exp(lo), total_cost(math.exp(lo))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c = total_cost(math.exp(mid))
        if c <= target:
            hi, best = mid, (math.exp(mid), c)
        else:
            lo = mid
    return best


def fill_budget(errs: list[torch.Tensor], costs: list[torch.Tensor], dense_costs: list[float],
                choice: list[int | None], budget: float, rounds: int = 64) -> list[int | None]:
    """Spend what a Lagrangian choice leaves of ``budget`` (greedy, best error decrease first).

    The price ``lam`` only reaches choices on the lower convex hull of each layer's (cost,
    error) curve, so the cheapest ``lam`` meeting a budget may leave part of it unused (a
    flat spectrum jumps from dense to rank 1). Per layer: ``errs[i]``, ``costs[i]`` (flat
    candidate arrays), ``dense_costs[i]`` (the dense option: error 0), ``choice[i]`` (a flat
    index, or None = dense). Each round moves the one layer whose best affordable candidate
    (cost within its current cost plus the leftover) lowers its error most; stops when no
    move lowers an error or after ``rounds`` moves. Returns the new choices."""
    choice = list(choice)

    def state(i: int) -> tuple[float, float]:
        c = choice[i]
        return (dense_costs[i], 0.0) if c is None else (float(costs[i][c]), float(errs[i][c]))

    for _ in range(rounds):
        left = budget - sum(state(i)[0] for i in range(len(choice)))
        best = (0.0, -1, None)
        for i in range(len(choice)):
            cost_now, err_now = state(i)
            if err_now <= 0:
                continue
            cap = cost_now + left
            if dense_costs[i] <= cap:
                gain, pick = err_now, None
            else:
                ok = (costs[i] <= cap) & (costs[i] < dense_costs[i])
                e = torch.where(ok, errs[i].double(), errs[i].new_full((), math.inf, dtype=torch.float64))
                j = int(torch.argmin(e))
                gain, pick = err_now - float(e[j]), j
            if gain > best[0]:
                best = (gain, i, pick)
        if best[1] < 0:
            break
        choice[best[1]] = best[2]
    return choice

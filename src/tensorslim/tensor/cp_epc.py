"""CPD-EPC: the CP decomposition of least sensitivity within an error bound (Phan, Tichavsky,
Sobolev, Sozykin, Ermilov, Cichocki, "Stable low-rank tensor decomposition for compression of
convolutional neural network", ECCV 2020).

**Sensitivity.** For X = [[A_1, ..., A_N]] (weights absorbed into the factors) the paper defines
``ss = lim_{s->0} E ||X - [[A_1 + dA_1, ..., A_N + dA_N]]||_F^2 / s^2`` for random perturbations
dA_n of variance s^2. To first order the perturbation of the tensor is
``sum_n [[A_1, .., dA_n, .., A_N]]`` and ``E ||[[.., dA_n, ..]]||^2 = v_n tr(H_n)`` with
``H_n = Hadamard_{k != n} (A_k^T A_k)`` and v_n the summed variance of one row of dA_n. Hence

* ``ss = sum_n tr(H_n)`` when every *column* of dA_n has expected squared norm s^2 (entries of
  variance s^2 / I_n). For N = 3 this is the seed's / slide's formula
  ``tr{(A^T A)*(B^T B) + (B^T B)*(C^T C) + (A^T A)*(C^T C)}``; it is :func:`sensitivity`'s
  default and what :func:`cp_epc` minimises;
* ``ss = sum_n I_n tr(H_n)`` for i.i.d. N(0, s^2) *entries* (``per_entry=True``), the literal
  reading of the definition: the slide's formula omits these sizes I_n. The slide's definition
  also divides by R, which its formula drops and so do we (a constant factor). Both forms are
  checked against the squared Frobenius norm of the Jacobian in the tests.

``tr(H_n) = sum_r prod_{k != n} ||a_{k,r}||^2`` depends on the column norms only, so rescaling
the columns of one rank-1 term (product fixed) changes ss but not X; equal column norms minimise
the default ss, where ``ss = N sum_r lambda_r^(2 (N-1) / N)`` with ``lambda_r`` the intensity
(Frobenius norm) of term r. For a matrix (N = 2) that is twice the nuclear norm.

**Algorithm** (the paper's one-factor-at-a-time update). With the others fixed, ss is
``||A_n D_n||_F^2 + const``, ``D_n = diag(sqrt(gamma))``,
``gamma_r = sum_{m != n} prod_{k not in {m, n}} ||a_{k,r}||^2``, and the bound is the ellipsoid
``||T_(n) - A_n K_n^T||^2 <= delta^2`` (K_n the Khatri-Rao product of the other factors, never
formed: only the MTTKRP ``M = T_(n) K_n`` and the Gram Hadamard ``V = K_n^T K_n`` are used).
With ``X = A_n D``, ``Phi = D^-1 V D^-1 = U diag(s) U^T`` and ``Z = M D^-1 U`` the minimiser is
``X = mu Z diag(1 / (1 + mu s)) U^T``, where the Lagrange multiplier mu > 0 solves the secular
equation ``sum_r q_r / (1 + mu s_r)^2 = delta^2 - e_LS^2`` (``q_r = ||z_r||^2 / s_r``,
``e_LS^2 = ||T||^2 - sum_r q_r`` the least-squares error). It is found by Newton's method on
``h(mu)^(-1/2)`` (concave, so Newton from mu = 0 converges monotonically, as for trust-region
steps). When the bound leaves no slack over the least-squares error (e.g. an exact fit) the
update is the ALS step. After every sweep the columns of each rank-1 term are rescaled to equal
norms (free: X is unchanged). Every update keeps ||T - X^|| <= delta once it holds, and never
increases ss.

**Warm start (our addition).** Started from a degenerate ALS solution these updates stall: each
factor is optimal given the others while points of far lower ss exist at the same error (e.g.
a random 8x7x6 tensor at rank 8, as in tests/tensor/test_cp_epc.py). So first a
continuation path ``min ||T - X^||^2 + rho ss`` with decreasing rho (ridge-regularised ALS, each
update ``A_n = M (V + rho diag(gamma))^-1``) leaves the degenerate basin; the constrained updates
start from its first point within the bound, or from the start if the path finds none less
sensitive (then, e.g. on an exact fit or a border-rank tensor, the result stays near the start).
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from ._common import (check_cp_rank, check_finite, check_int, check_tensor, check_tol,
                      make_generator, small_linalg_threads)
from ._cp_core import exact_error, finalize, hadamard_all, solve_normal
from .cp import cp_als
from .results import CPTensor

__all__ = ["component_intensities", "cp_epc", "sensitivity"]

# continuation warm start (see _EPC.escape): rho_0 = _RHO0 ||T||^(2/N), times _RHO_STEP per stage
_RHO0, _RHO_STEP, _STAGES, _STAGE_SWEEPS = 0.01, 1.0 / 3.0, 16, 30
_EPS64 = torch.finfo(torch.float64).eps
_ESCAPE_MIN = 1e-10  # skip it when (delta / ||T||)^2 is below this (an exact fit: no room)


def sensitivity(cp: CPTensor, *, per_entry: bool = False) -> float:
    """Sensitivity of the CP ``cp`` (factors (I_n, R), weights (R,)), see the module docstring.

    The weights are absorbed evenly: column r of every factor is scaled by ``|w_r|^(1/N)``
    (for unit-norm columns, as :func:`cp_als` / :func:`cp_epc` return, that is the rescaling of
    least default sensitivity). Returns ``sum_n c_n tr(Hadamard_{k != n} A_k^T A_k)`` with
    ``c_n = 1`` (default) or ``c_n = I_n`` (``per_entry=True``: i.i.d. entry perturbations).
    """
    _check_cp(cp, "cp")
    sq = torch.stack([(f.double() ** 2).sum(0) for f in _absorbed(cp)])  # (N, R)
    total = 0.0
    for n in range(sq.shape[0]):
        c = float(cp.factors[n].shape[0]) if per_entry else 1.0
        total += c * float(torch.cat([sq[:n], sq[n + 1:]]).prod(0).sum())
    return total


def component_intensities(cp: CPTensor, *, descending: bool = True) -> torch.Tensor:
    """Frobenius norms (R,) of the rank-1 terms: ``|w_r| prod_n ||factors[n][:, r]||``,
    sorted descending (``descending=False``: in component order)."""
    _check_cp(cp, "cp")
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in cp.factors]).prod(0)
    out = cp.weights.abs() * norms
    return torch.sort(out, descending=True).values if descending else out


def cp_epc(
    t: torch.Tensor,
    rank: int,
    *,
    delta: float | None = None,
    init: CPTensor | None = None,
    n_iter: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
) -> CPTensor:
    """Rank-``rank`` CP of ``t`` (I_0, ..., I_{N-1}), N >= 2, of least (default)
    :func:`sensitivity` subject to ``||t - X^||_F <= delta`` (an absolute Frobenius bound).

    ``init``: a :class:`CPTensor` of ``t``'s shape and ``rank`` to start from; default
    ``cp_als(t, rank, seed=seed)``. ``delta``: default the error ``||t - init||`` of the start,
    so the result fits as well as plain CP. If the start violates the bound, the updates are ALS
    steps until it holds. Stops after ``n_iter`` sweeps or when the relative change of both the
    sensitivity and the error over a sweep is <= ``tol``.
    Returns :class:`CPTensor` like :func:`cp_als` (weights (R,) descending, unit-norm columns,
    ``errors`` = relative error ||t - X^|| / ||t|| after every sweep, the warm start's included
    when it is used).
    Same ``seed`` (and ``init``) gives identical factors. Works in float64 whatever ``t``'s
    dtype (the bound is met on its boundary, which needs accurate error values) and returns
    ``t``'s dtype and device.
    """
    check_tensor(t, "t", min_dim=2, finite=True)
    shape = tuple(int(s) for s in t.shape)
    if 0 in shape:
        raise ValueError(f"t must not be empty, got shape {shape}")
    rank = check_cp_rank(rank, shape)
    n_iter = check_int(n_iter, "n_iter")
    tol = check_tol(tol)
    make_generator(seed)  # validates seed
    if delta is not None:
        delta = _check_delta(delta)
    if init is not None:
        _check_init(init, shape, rank)
    # every update is a few (R, R) / (I_n, R) operations plus the MTTKRP, ~ numel * R
    with small_linalg_threads(t.numel() * rank, t.device):
        return _cp_epc(t, rank, delta, init, n_iter, tol, seed)


def _cp_epc(t: torch.Tensor, rank: int, delta: float | None, init: CPTensor | None,
            n_iter: int, tol: float, seed: int) -> CPTensor:
    """:func:`cp_epc` on validated arguments."""
    start = cp_als(t, rank, seed=seed) if init is None else init
    start = CPTensor(weights=start.weights.to(t), factors=tuple(f.to(t) for f in start.factors))
    norm_sq = float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)
    if norm_sq == 0.0:
        zeros = torch.zeros_like(start.weights)
        return CPTensor(weights=zeros, factors=start.factors, errors=(0.0,))
    if delta is None:
        delta = float(torch.linalg.vector_norm(t - start.to_tensor(), dtype=torch.float64))
    if delta * delta >= norm_sq:
        raise ValueError(f"delta={delta:g} must be below ||t|| = {norm_sq ** 0.5:g}: with it the "
                         f"zero tensor meets the bound; accepted: 0 < delta < ||t||")
    state = _EPC(t.double(), [f.double() for f in _absorbed(start)], norm_sq, delta)
    errors = state.escape() if delta * delta > _ESCAPE_MIN * norm_sq else []
    prev = None
    for _ in range(n_iter):
        err = state.sweep()
        cur = (state.sensitivity(), err)
        errors.append(err)
        if prev is not None and _converged(prev, cur, tol):
            break
        prev = cur
    factors = [f.to(t.dtype) for f in state.factors]
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])
    weights = norms.prod(0)
    factors = [f / torch.where(n > 0, n, torch.ones_like(n)) for f, n in zip(factors, norms)]
    return finalize(weights, factors, tuple(errors))


class _EPC:
    """State of one CPD-EPC run: float64 factors (weights absorbed, balanced) and Grams, and for
    every mode ``n`` a copy of ``t`` permuted to (I_n, others by size, largest last)."""

    def __init__(self, t: torch.Tensor, factors: list[torch.Tensor], norm_sq: float, delta: float):
        self.t, self.norm_sq, self.shape = t, norm_sq, tuple(int(s) for s in t.shape)
        self.factors = _balance(factors)
        self.grams = [f.T @ f for f in self.factors]
        # aim a hair inside the bound so rounding cannot push the error above delta
        self.floor = 64.0 * _EPS64 * norm_sq
        self.delta_sq = delta * delta
        self.target_sq = self.delta_sq - max(1e-13 * self.delta_sq, self.floor)
        self.orders, self.perms = [], []
        for n in range(len(self.shape)):
            others = sorted((m for m in range(len(self.shape)) if m != n), key=lambda m: self.shape[m])
            order = [n] + others
            self.orders.append(order)
            self.perms.append(t.permute(order).contiguous())

    def mttkrp(self, n: int) -> torch.Tensor:
        """``T_(n) @ khatri_rao(others)`` (I_n, R) in float64, contracting the largest other
        mode by one matmul, then the rest one at a time (the Khatri-Rao product is never built)."""
        order, rank, fs = self.orders[n], self.factors[0].shape[1], self.factors
        x = self.perms[n].reshape(-1, self.shape[order[-1]]) @ fs[order[-1]]
        for m in reversed(order[1:-1]):
            x = torch.einsum("aib,ib->ab", x.reshape(-1, self.shape[m], rank), fs[m])
        return x.reshape(self.shape[n], rank)

    def escape(self) -> list[float]:
        """Warm start by continuation: sweeps of ``min ||T - X^||^2 + rho ss`` (each update a
        ridge solve ``A_n = M (V + rho diag(gamma))^-1``) for ``rho`` falling geometrically from
        ``0.01 ||T||^(2/N)``, until the error is within the bound. The constrained updates, which
        move one factor at a time on the boundary, stall in the degenerate basin of an ALS start
        (blockwise optimal, far from optimal); the penalised path leaves it. If it does not reach
        the bound before its sensitivity exceeds the start's, the start is kept. Returns the
        error after every sweep of the path (none when the start is kept)."""
        saved = (list(self.factors), self.sensitivity())
        rho = _RHO0 * self.norm_sq ** (1.0 / len(self.shape))
        errors: list[float] = []
        for _ in range(_STAGES):
            prev = None
            for _ in range(_STAGE_SWEEPS):
                err = self.sweep(rho)
                errors.append(err)
                obj = err * err * self.norm_sq + rho * self.sensitivity()
                if prev is not None and abs(prev - obj) <= 1e-5 * prev:
                    break
                prev = obj
            if err * err * self.norm_sq <= self.target_sq or self.sensitivity() >= saved[1]:
                break
            rho *= _RHO_STEP
        if err * err * self.norm_sq > self.target_sq or self.sensitivity() >= saved[1]:
            self.factors = saved[0]
            self.grams = [f.T @ f for f in self.factors]
            return []
        return errors

    def sensitivity(self) -> float:
        sq = torch.stack([g.diagonal() for g in self.grams])
        return float(sum(torch.cat([sq[:n], sq[n + 1:]]).prod(0).sum() for n in range(sq.shape[0])))

    def sweep(self, rho: float | None = None) -> float:
        """Update every factor once (within the bound, or by the ``rho``-penalised ridge step),
        rebalance; returns the relative error after the sweep."""
        n_modes = len(self.factors)
        for n in range(n_modes):
            m = self.mttkrp(n)
            if rho is None:
                self.factors[n] = self.update(n, m)
            else:
                v = hadamard_all(self.grams, skip=n)
                self.factors[n] = solve_normal(m, v + rho * torch.diag(self._gamma(n)))
            self.grams[n] = self.factors[n].T @ self.factors[n]
        err = self.error(m, n_modes - 1)
        self.factors = _balance(self.factors)
        self.grams = [f.T @ f for f in self.factors]
        return err

    def update(self, n: int, m: torch.Tensor) -> torch.Tensor:
        """The factor n of least sensitivity within the bound (see the module docstring)."""
        v = hadamard_all(self.grams, skip=n)
        gamma = self._gamma(n)
        d = gamma.clamp_min(float(gamma.max()) * 1e-30 + 1e-300).sqrt()
        s, u = torch.linalg.eigh(v / (d[:, None] * d[None, :]))
        s = s.clamp_min(0.0)
        z = (m / d) @ u  # (I_n, R)
        z2 = (z * z).sum(0)
        keep = s > float(s.max()) * s.shape[0] * torch.finfo(torch.float64).eps
        q = torch.where(keep, z2 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        slack = self.target_sq - (self.norm_sq - float(q.sum()))
        if slack <= self.floor:  # no room over the least-squares error
            return self.no_room(n, m, v)
        mu = _secular_root(q[keep].cpu().numpy(), s[keep].cpu().numpy(), slack)
        coef = torch.where(keep, mu / (1.0 + mu * s), torch.zeros_like(s))
        new = ((z * coef) @ u.T) / d
        cur = self.factors[n]
        if self._resid_sq(m, v, new) > self.delta_sq >= self._resid_sq(m, v, cur):
            return cur  # rounding in the eigen-solution: never step out of the bound
        return new

    def no_room(self, n: int, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Factor n when the bound leaves no slack: the current one if it meets the bound (away
        from the rounding floor), else the ALS step (the least error)."""
        a = self.factors[n]
        if self.delta_sq > 1e4 * self.floor and self._resid_sq(m, v, a) <= self.delta_sq:
            return a
        return solve_normal(m, v)

    def _resid_sq(self, m: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> float:
        """||T - X^||^2 with factor n = ``a`` (``m``, ``v``: its MTTKRP and Gram Hadamard)."""
        return self.norm_sq - 2.0 * float((m * a).sum()) + float((v * (a.T @ a)).sum())

    def _gamma(self, n: int) -> torch.Tensor:
        """(R,) weights of ``||a_{n,r}||^2`` in ss: sum_{m != n} prod_{k not in {m, n}} ||a_k,r||^2."""
        sq = torch.stack([g.diagonal() for g in self.grams])  # (N, R) squared column norms
        others = [k for k in range(len(self.grams)) if k != n]
        return sum(sq[[k for k in others if k != j]].prod(0) for j in others)

    def error(self, m: torch.Tensor, n: int) -> float:
        """Relative error from the MTTKRP ``m`` of mode ``n`` (other factors current); rebuilds
        the tensor only near the rounding floor."""
        inner = float((m * self.factors[n]).sum())
        model_sq = float(hadamard_all(self.grams, skip=-1).sum())
        resid_sq = self.norm_sq - 2.0 * inner + model_sq
        # rounding ~ eps (sum_r ||term r||)^2: large when components cancel (as in cp.py)
        terms = float(torch.stack([g.diagonal() for g in self.grams]).prod(0).sqrt().sum())
        if resid_sq > 1e4 * _EPS64 * max(self.norm_sq, terms * terms):
            return (resid_sq / self.norm_sq) ** 0.5
        ones = torch.ones_like(self.factors[0][0])
        return exact_error(self.t, ones, self.factors, self.norm_sq)


def _converged(prev: tuple[float, float], cur: tuple[float, float], tol: float) -> bool:
    """Relative changes of the sensitivity and of the error <= ``tol`` (an error change within
    the float64 rounding noise of an exact fit counts as none)."""
    (ss0, e0), (ss1, e1) = prev, cur
    ss_ok = abs(ss0 - ss1) <= tol * ss0
    return ss_ok and (abs(e0 - e1) <= tol * e0 or abs(e0 * e0 - e1 * e1) <= 1e4 * _EPS64)


def _secular_root(q: np.ndarray, s: np.ndarray, slack: float) -> float:
    """mu > 0 with ``h(mu) = sum q / (1 + mu s)^2 = slack`` (0 < slack < h(0)), by Newton's
    method on ``h^(-1/2) - slack^(-1/2)``, concave and increasing: from mu = 0 the iterates
    rise monotonically to the root (quadratically near it)."""
    if float(q.sum()) <= slack:
        return 0.0
    target, mu = slack ** -0.5, 0.0
    for _ in range(200):
        den = 1.0 + mu * s
        h = float((q / den ** 2).sum())
        dh = -2.0 * float((q * s / den ** 3).sum())
        phi = h ** -0.5 - target
        if phi >= 0.0 or dh == 0.0:
            break
        step = -phi / (-0.5 * h ** -1.5 * dh)
        mu += step
        if step <= 1e-15 * mu:
            break
    return mu


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale the columns of every rank-1 term to equal norms (their geometric mean), which
    leaves the tensor unchanged and minimises the default sensitivity; zero terms stay zero."""
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])  # (N, R)
    gmean = norms.log().mean(0).exp()
    scale = torch.where(norms > 0, gmean / torch.where(norms > 0, norms, 1.0), 0.0)
    return [f * sc for f, sc in zip(factors, scale)]


def _absorbed(cp: CPTensor) -> list[torch.Tensor]:
    """Factors with column r scaled by ``|w_r|^(1/N)``, the sign of ``w_r`` in factor 0."""
    w = cp.weights
    scale = w.abs() ** (1.0 / len(cp.factors))
    out = [f * scale.to(f) for f in cp.factors]
    out[0] = out[0] * torch.where(w < 0, -1.0, 1.0).to(out[0])
    return out


def _check_cp(cp: object, name: str) -> CPTensor:
    if not isinstance(cp, CPTensor):
        raise TypeError(f"{name} must be a CPTensor, got {type(cp).__name__}")
    rank = cp.rank
    bad = [tuple(f.shape) for f in cp.factors if f.dim() != 2 or f.shape[1] != rank]
    if len(cp.factors) < 2 or bad:
        raise ValueError(f"{name} must have >= 2 factors of shape (I_n, {rank}) for its {rank} "
                         f"weights; got factor shapes {[tuple(f.shape) for f in cp.factors]}")
    return cp


def _check_init(init: object, shape: tuple[int, ...], rank: int) -> CPTensor:
    cp = _check_cp(init, "init")
    for n, f in enumerate((cp.weights,) + tuple(cp.factors)):
        check_finite(f, "init.weights" if n == 0 else f"init.factors[{n - 1}]")
    if cp.shape != shape or cp.rank != rank:
        raise ValueError(f"init must be a CPTensor of shape {shape} and rank {rank}, got shape "
                         f"{cp.shape} and rank {cp.rank}")
    return cp


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, Real) or not math.isfinite(delta) \
            or not delta > 0:
        raise ValueError(f"delta must be a finite number > 0 (an absolute Frobenius error bound "
                         f"||t - X^||), got {delta!r}")
    return float(delta)

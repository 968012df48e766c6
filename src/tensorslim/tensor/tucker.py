"""(Partial) Tucker decomposition: HOSVD initialisation refined by HOOI.

``tucker(X, ranks, modes=(0, 1))`` is the Tucker-2 of a conv kernel (T, S, kh, kw): the core
keeps the spatial modes whole. Every subspace, of the HOSVD and of each HOOI mode update, is the
leading eigenspace of a small Gram matrix ``Y_(n) @ Y_(n).T`` (I_n, I_n), Y = X projected on the
other decomposed modes (X itself for the HOSVD): the same fixed points as an SVD of the wide
unfolding at a fraction of its cost. The projections start from unfoldings of X computed once,
so a sweep never copies X. For Tucker-2 with a rank above half the other mode's size, the Gram
is taken as the full Gram minus that of the projection on the (thinner) complement. The error
of each sweep comes from the Gram's eigenvalues; the core is formed once at the end. Signs are
fixed so the output is deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import (check_choice, check_int, check_mode, check_tensor, check_tol, fix_signs,
                      has_converged, make_generator, small_linalg_threads)
from .ops import mode_dot, unfold
from .results import TuckerTensor

__all__ = ["tucker"]

_INITS = ("hosvd", "random")


def tucker(
    t: torch.Tensor,
    ranks: int | Sequence[int],
    *,
    modes: Sequence[int] | None = None,
    n_iter: int = 50,
    tol: float = 1e-4,
    init: str = "hosvd",
    seed: int = 0,
) -> TuckerTensor:
    """Tucker decomposition of ``t`` (I_0, ..., I_{N-1}) over ``modes`` (default: all).

    ``ranks``: one int per decomposed mode (an int is used for every mode), each in
    ``[1, I_mode]``. Returns :class:`TuckerTensor` whose ``core`` is ``t``'s shape with each
    decomposed mode replaced by its rank and ``factors[i]`` (I_{modes[i]}, ranks[i]) with
    orthonormal columns; ``errors`` is the relative error after initialisation and after every
    HOOI sweep. Stops after ``n_iter`` sweeps or when the relative change of the error is below
    ``tol``. On unstructured tensors such as network weights HOOI creeps on for hundreds of
    sweeps, each gaining less than the last; the default ``tol`` stops it once a sweep improves
    the error by less than 0.01% (pass a smaller ``tol`` to converge further). Runs in ``t``'s
    dtype. ``init="random"`` starts from random orthonormal factors drawn with ``seed``.
    Raises ValueError for NaN/Inf entries or a rank out of range.
    """
    check_tensor(t, "t", min_dim=1, finite=True)
    modes = _check_modes(modes, t.dim())
    ranks = _check_ranks(ranks, modes, tuple(t.shape))
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    tol = check_tol(tol)
    init = check_choice(init, "init", _INITS)
    gen = make_generator(seed) if init == "random" else None
    # the largest operations are the Grams X_(n) X_(n)^T of the HOSVD, ~ numel * I_n
    with small_linalg_threads(t.numel() * max(t.shape[m] for m in modes), t.device):
        return _tucker(t, ranks, modes, n_iter, tol, init, gen)


def _tucker(t: torch.Tensor, ranks: tuple[int, ...], modes: tuple[int, ...], n_iter: int,
            tol: float, init: str, gen: torch.Generator | None) -> TuckerTensor:
    """:func:`tucker` on validated arguments."""
    hooi = _HOOI(t, ranks, modes)
    if init == "hosvd":
        for i in range(len(modes)):
            hooi.update(i, hooi.full_gram(i))
    else:
        for i, (m, r) in enumerate(zip(modes, ranks)):
            hooi.set_basis(i, _random_basis(t.shape[m], r, gen, t))
    errors = _sweeps(hooi, n_iter, tol)
    core = _project(t, hooi.factors, modes)
    final = _error(t, core, hooi.factors, modes, hooi.norm_sq)  # measured on the returned core
    errors = errors[:-1] + [final] if errors else [final]
    return TuckerTensor(core=core, factors=tuple(hooi.factors), modes=modes,
                        errors=tuple(errors))


def _sweeps(hooi: "_HOOI", n_iter: int, tol: float) -> list[float]:
    """Up to ``n_iter`` HOOI sweeps from ``hooi``'s initial factors; returns the relative
    errors after initialisation and after each sweep. Stops when the error is at rounding level
    or its relative change is below ``tol``."""
    errors: list[float] = []
    for _ in range(n_iter):
        for i in range(len(hooi.modes)):
            gram = hooi.gram(i)
            if not errors:  # the first Gram gives the initial factors' error
                errors.append(hooi.error(_captured(gram, hooi.factors[0])))
                if errors[0] <= hooi.floor:  # exact up to rounding: nothing to improve
                    return errors
            captured = hooi.update(i, gram)
        errors.append(hooi.error(captured))
        # ||X||^2 - ||G||^2 carries ~ a few eps of rounding noise: do not chase it.
        if errors[-1] <= hooi.floor or has_converged(errors[-2], errors[-1], tol,
                                                     hooi.t.dtype, noise=10.0):
            break
    return errors


class _HOOI:
    """The state of HOOI on ``t``: per decomposed mode an orthonormal basis (I_n, I_n) of which
    the first ``ranks[i]`` columns are the factor, the unfoldings of ``t`` (I_n, prod others)
    and, when used, the full Grams ``X_(n) X_(n)^T``."""

    def __init__(self, t: torch.Tensor, ranks: tuple[int, ...], modes: tuple[int, ...]) -> None:
        self.t, self.ranks, self.modes = t, ranks, modes
        self.shape = tuple(t.shape)
        self.norm_sq = float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)
        self.floor = 100 * torch.finfo(t.dtype).eps
        # mode-n unfoldings, made once: every projection below is one GEMM on one of them
        self.unfoldings = [unfold(t, m) for m in modes]
        self.bases: list[torch.Tensor | None] = [None] * len(modes)
        self.factors: list[torch.Tensor] = [torch.empty(0)] * len(modes)
        self._full_grams: dict[int, torch.Tensor] = {}

    def full_gram(self, i: int) -> torch.Tensor:
        """``X_(n) X_(n)^T`` (I_n, I_n) for n = modes[i], computed once."""
        if i not in self._full_grams:
            self._full_grams[i] = _gram(self.unfoldings[i])
        return self._full_grams[i]

    def set_basis(self, i: int, basis: torch.Tensor) -> None:
        self.bases[i] = basis
        self.factors[i] = basis[:, :self.ranks[i]]

    def update(self, i: int, gram: torch.Tensor) -> float:
        """Factor i <- the leading ``ranks[i]`` eigenvectors of ``gram``; returns the captured
        energy (the sum of their eigenvalues)."""
        vals, vecs = torch.linalg.eigh(gram)  # ascending
        vecs = vecs.flip(1)
        vecs = vecs * fix_signs(vecs)
        self.set_basis(i, vecs)
        return float(vals[-self.ranks[i]:].sum(dtype=torch.float64))

    def gram(self, i: int) -> torch.Tensor:
        """Gram (I_n, I_n) of the mode-n unfolding of Y = X x_m U_m^T for every decomposed
        m != n = modes[i]."""
        others = [j for j in range(len(self.modes)) if j != i]
        if not others:
            return self.full_gram(i)
        j = min(others, key=lambda k: self.ranks[k] / self.shape[self.modes[k]])
        if len(others) == 1 and 2 * self.ranks[j] > self.shape[self.modes[j]]:
            # X_(n) (U U^T) X_(n)^T = X_(n) X_(n)^T - X_(n) (V V^T) X_(n)^T, V the complement
            # of U (fewer columns): P_U = I - P_V
            rest = self.bases[j][:, self.ranks[j]:]
            return self.full_gram(i) - self._projected_gram(i, j, rest, [])
        return self._projected_gram(i, j, self.factors[j], [k for k in others if k != j])

    def _projected_gram(self, i: int, j: int, first: torch.Tensor,
                        more: list[int]) -> torch.Tensor:
        """Gram of the mode-``modes[i]`` unfolding of X projected on ``first`` (I_m, k) in
        mode m = modes[j] (one GEMM on the precomputed unfolding) and then on the factors of
        the decomposed modes ``more``."""
        m = self.modes[j]
        axes = [m] + [a for a in range(len(self.shape)) if a != m]
        y = (first.transpose(0, 1) @ self.unfoldings[j]).reshape(
            (first.shape[1],) + tuple(self.shape[a] for a in axes[1:]))
        for k in more:
            y = mode_dot(y, self.factors[k].transpose(0, 1), axes.index(self.modes[k]))
        return _gram(unfold(y, axes.index(self.modes[i])))

    def error(self, captured: float) -> float:
        """Relative error ||X - G x U|| / ||X|| = sqrt(||X||^2 - ||G||^2) / ||X|| of the current
        factors from the captured energy ||G||^2, or measured on the core when that difference
        is below the working precision."""
        if self.norm_sq == 0.0:
            return 0.0
        resid_sq = self.norm_sq - captured
        if resid_sq > 1e4 * torch.finfo(self.t.dtype).eps * self.norm_sq:
            return (resid_sq / self.norm_sq) ** 0.5
        core = _project(self.t, self.factors, self.modes)
        return _error(self.t, core, self.factors, self.modes, self.norm_sq)


def _gram(mat: torch.Tensor) -> torch.Tensor:
    """``mat @ mat.T`` (m, m), symmetrised against rounding."""
    g = mat @ mat.transpose(0, 1)
    return (g + g.transpose(0, 1)) * 0.5


def _captured(gram: torch.Tensor, u: torch.Tensor) -> float:
    """trace(U^T A U): the energy of the core when A is the Gram of the mode update of U."""
    return float(((gram @ u) * u).sum(dtype=torch.float64))


def _check_modes(modes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, (int, str)) or not isinstance(modes, Sequence):
        raise TypeError(f"modes must be a sequence of ints, got {modes!r}")
    out = tuple(check_mode(m, ndim, "modes") for m in modes)
    if not out:
        raise ValueError("modes must name at least one mode, got an empty sequence")
    if len(set(out)) != len(out):
        raise ValueError(f"modes must be distinct, got {tuple(modes)}")
    return out


def _check_ranks(ranks: int | Sequence[int], modes: tuple[int, ...],
                 shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [ranks] * len(modes)
    if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be an int or a sequence of ints, got {ranks!r}")
    if len(ranks) != len(modes):
        raise ValueError(f"ranks={tuple(ranks)} must have one entry per decomposed mode "
                         f"{modes} ({len(modes)} entries)")
    out = []
    for r, m in zip(ranks, modes):
        r = check_int(r, f"ranks entry for mode {m}")
        if r > shape[m]:
            raise ValueError(f"ranks entry {r} for mode {m} exceeds its size {shape[m]} "
                             f"(tensor shape {shape}); accepted: 1 <= rank <= {shape[m]}")
        out.append(r)
    return tuple(out)


def _random_basis(n: int, r: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (n, n) whose first ``r`` columns are a random orthonormal factor."""
    q = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64), mode="complete").Q
    q = q.to(device=like.device, dtype=like.dtype)
    return q * fix_signs(q)


def _project(t: torch.Tensor, factors: list[torch.Tensor], modes: tuple[int, ...],
             skip: int | None = None) -> torch.Tensor:
    """``t x_m U_m^T`` over ``modes`` (except ``modes[skip]``), most shrinking mode first."""
    order = sorted((i for i in range(len(modes)) if i != skip),
                   key=lambda i: factors[i].shape[1] / factors[i].shape[0])
    out = t
    for i in order:
        out = mode_dot(out, factors[i].transpose(0, 1), modes[i])
    return out


def _error(t: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor],
           modes: tuple[int, ...], norm_sq: float) -> float:
    """||X - G x U|| / ||X|| = sqrt(||X||^2 - ||G||^2) / ||X|| (orthonormal factors), measured
    directly when that difference is below the working precision."""
    if norm_sq == 0.0:
        return 0.0
    resid_sq = norm_sq - float(torch.linalg.vector_norm(core, dtype=torch.float64) ** 2)
    if resid_sq > 1e4 * torch.finfo(t.dtype).eps * norm_sq:
        return (resid_sq / norm_sq) ** 0.5
    rebuilt = core
    for u, m in zip(factors, modes):
        rebuilt = mode_dot(rebuilt, u, m)
    return float(torch.linalg.vector_norm(t - rebuilt, dtype=torch.float64)) / norm_sq ** 0.5

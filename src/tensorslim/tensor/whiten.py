"""Data-aware (output-error) low-rank factorisation of a weight matrix.

A Linear ``y = W x`` sees inputs x with second moment ``G = sum_i x_i x_i^T`` (N, N). The
output error of an approximation W^ on those inputs is

    ||(W - W^) X^T||_F^2 = tr((W - W^) G (W - W^)^T) = ||(W - W^) T||_F^2,   G = T T^T,

so the best rank-k W^ for the *outputs* is the truncated SVD of ``W T`` mapped back:
``W T = U S V^T``, ``W^ = U_k S_k V_k^T T^-1`` (SVD-LLM, Wang et al. 2024, with T the Cholesky
factor of G and a diagonal shift when G is singular). Its squared error is the tail of the
singular values of ``W T`` (Eckart-Young in the T-metric), which gives the whole output-error
curve over ranks from one SVD. This is exactly the reduced-rank regression of Y = X W^T on X:
the fitted outputs' top-k principal directions are the top-k left singular vectors of W T
(:func:`reduced_rank_regression` solves the general problem, a cross moment ``X^T Y`` from
another network included, through the same whitened SVD).

Variants behind the same result type:

* :func:`whitened_svd` (SVD-LLM): T = chol(G), optimal for the output error.
* :func:`asvd` (ASVD, Yuan et al. 2023): T = diag(s^alpha), s the mean |activation| per input
  channel: cheap, channel outliers only.
* :func:`row_weighted_svd` (FWSVD, Hsu et al. 2022): rows weighted by their Fisher information
  sqrt(sum_j (dL/dW_ij)^2), i.e. SVD of diag(w) W, for a task loss.

Every result keeps ``curve``: the relative squared output error ||dW T_G||^2 / ||W T_G||^2 at
every rank 0..full (T_G from ``gram`` when one is given), for rank allocation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_choice, check_rank, check_tensor, fix_signs, small_linalg_threads

__all__ = ["WhitenedSVD", "whitening_factor", "whitened_svd", "asvd", "row_weighted_svd",
           "output_error_curve", "reduced_rank_regression"]

_SHIFTS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # diagonal shifts tried, x mean(diag G)


@dataclass(frozen=True, eq=False)
class WhitenedSVD:
    """``W ~= U @ diag(S) @ Vh`` where ``Vh = V_k^T T^-1`` is NOT orthonormal (it carries the
    inverse of the input scaling T). Shapes: ``U`` (M, r) orthonormal columns, ``S`` (r,)
    descending, ``Vh`` (r, N). ``curve`` (full + 1,) float64: relative squared output error
    at ranks 0, 1, ..., full (empty when no input statistics were given); ``shift``: the
    diagonal shift (relative to mean(diag G)) that made G positive definite."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    curve: torch.Tensor
    shift: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def to_tensor(self) -> torch.Tensor:
        """The approximation W^ (M, N)."""
        return (self.U * self.S) @ self.Vh

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U S^1/2 (M, r), S^1/2 Vh (r, N)): the two Linear weights (SVD-LLM's U', V')."""
        root = self.S.clamp_min(0).sqrt()
        return self.U * root, root[:, None] * self.Vh

    def truncate(self, rank: int) -> "WhitenedSVD":
        """The first ``rank`` components (the optimum of that rank in the same metric)."""
        r = check_rank(rank, "rank", self.rank, f"the decomposition's rank {self.rank}")
        return WhitenedSVD(self.U[:, :r], self.S[:r], self.Vh[:r], self.curve, self.shift)


def _check_gram(gram: torch.Tensor, n: int, name: str = "gram") -> torch.Tensor:
    check_tensor(gram, name, min_dim=2, finite=True)
    if gram.shape != (n, n):
        raise ValueError(f"{name} must be ({n}, {n}) (the input second moment X^T X of a weight "
                         f"with {n} columns), got shape {tuple(gram.shape)}")
    return gram.to(torch.float64)


def whitening_factor(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(T lower triangular with ``T T^T = G + shift * mean(diag G) * I``, shift): the Cholesky
    factor of the symmetric PSD ``gram`` (N, N), with the smallest diagonal shift of
    0, 1e-10, ..., 1e-2 that makes it positive definite (SVD-LLM's remedy for singular G)."""
    g = _check_gram(gram, gram.shape[0] if gram.dim() == 2 else -1)
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for shift in _SHIFTS:
        t, info = torch.linalg.cholesky_ex(g + shift * scale * eye)
        if int(info) == 0:
            return t, shift
    raise ValueError(f"gram is not positive semi-definite (Cholesky fails even with a diagonal "
                     f"shift of {_SHIFTS[-1]:g} x mean diagonal): pass X^T X of real inputs")


def _tail(s: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared error at ranks 0..len(s): tail sums of s^2 (x mass) / total."""
    e = s.double() ** 2 * (1.0 if mass is None else mass)
    tail = torch.flip(torch.cumsum(torch.flip(e, (0,)), 0), (0,))
    total = float(tail[0]) if tail.numel() else 0.0
    out = torch.cat([tail, tail.new_zeros(1)])
    return (out / total).clamp_min(0.0) if total > 0 else torch.zeros_like(out)


def _scaled_svd(w: torch.Tensor, t: torch.Tensor, rank: int | None, t_gram: torch.Tensor | None,
                shift: float, lower: bool) -> WhitenedSVD:
    """SVD of W T, back-transformed by T^-1 (T lower triangular, or diagonal as a vector);
    ``t_gram``: the whitening factor of G for the output-error curve (None: no curve)."""
    wt = w @ t if t.dim() == 2 else w * t
    with small_linalg_threads(float(wt.shape[0]) * wt.shape[1] * min(wt.shape)):
        u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    signs = fix_signs(u)
    u, vh = u * signs, vh * signs[:, None]
    if t.dim() == 2:  # Vh T^-1: solve X T = Vh
        back = torch.linalg.solve_triangular(t, vh, upper=not lower, left=False)
    else:
        back = vh / t
    if t_gram is None:
        curve = torch.zeros(0, dtype=torch.float64)
    elif t_gram is t:
        curve = _tail(s)
    else:  # error of the nested truncations in the G-metric: sum_{i>k} s_i^2 ||(Vh T^-1 T_G)_i||^2
        curve = _tail(s, (back @ t_gram).square().sum(dim=1))
    r = s.shape[0] if rank is None else check_rank(rank, "rank", s.shape[0], f"min(M, N) = {s.shape[0]}")
    return WhitenedSVD(u[:, :r], s[:r], back[:r], curve, shift)


def _weight(weight: torch.Tensor) -> torch.Tensor:
    return check_tensor(weight, "weight", min_dim=2, finite=True).to(torch.float64)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int | None = None) -> WhitenedSVD:
    """SVD-LLM: the rank-``rank`` W^ minimising ||(W - W^) X^T|| for inputs with second moment
    ``gram`` = X^T X (N, N). ``weight`` (M, N); ``rank`` None keeps min(M, N) components.
    Computed in float64; ``curve`` is the exact relative squared output error at every rank."""
    w = _weight(weight)
    t, shift = whitening_factor(_check_gram(gram, w.shape[1]))
    return _scaled_svd(w, t, rank, t, shift, lower=True)


def asvd(weight: torch.Tensor, scale: torch.Tensor, rank: int | None = None, *, alpha: float = 0.5,
         gram: torch.Tensor | None = None) -> WhitenedSVD:
    """ASVD: SVD of ``W diag(scale^alpha)`` mapped back by ``diag(scale^-alpha)``; ``scale``
    (N,) the mean absolute input activation per channel (zeros are floored at 1e-6 x max).
    With ``gram`` (N, N), ``curve`` is the true relative squared output error per rank."""
    w = _weight(weight)
    s = check_tensor(scale, "scale", min_dim=1, finite=True).to(torch.float64)
    if s.shape != (w.shape[1],) or bool((s < 0).any()):
        raise ValueError(f"scale must be ({w.shape[1]},) and >= 0 (mean |x| per input channel), "
                         f"got shape {tuple(s.shape)}")
    if not 0 <= alpha <= 2:
        raise ValueError(f"alpha must be in [0, 2] (ASVD uses 0.5), got {alpha!r}")
    s = s.clamp_min(float(s.max()) * 1e-6 if float(s.max()) > 0 else 1.0) ** alpha
    tg = None if gram is None else whitening_factor(_check_gram(gram, w.shape[1]))[0]
    return _scaled_svd(w, s, rank, tg, 0.0, lower=True)


def row_weighted_svd(weight: torch.Tensor, row_weights: torch.Tensor, rank: int | None = None, *,
                     gram: torch.Tensor | None = None) -> WhitenedSVD:
    """FWSVD: SVD of ``diag(row_weights) W`` mapped back, ``row_weights`` (M,) > 0 (sqrt of each
    output row's summed squared loss gradients). The weighting acts on the left, so ``U``
    here is NOT orthonormal and ``Vh`` is; ``curve`` as in :func:`asvd`."""
    w = _weight(weight)
    d = check_tensor(row_weights, "row_weights", min_dim=1, finite=True).to(torch.float64)
    if d.shape != (w.shape[0],) or bool((d < 0).any()):
        raise ValueError(f"row_weights must be ({w.shape[0]},) and >= 0, got shape {tuple(d.shape)}")
    d = d.clamp_min(float(d.max()) * 1e-6 if float(d.max()) > 0 else 1.0)
    dw = w * d[:, None]
    with small_linalg_threads(float(dw.shape[0]) * dw.shape[1] * min(dw.shape)):
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    signs = fix_signs(u)
    u, vh = u * signs / d[:, None], vh * signs[:, None]  # W^ = D^-1 U_k S_k Vh_k
    curve = torch.zeros(0, dtype=torch.float64)
    if gram is not None:
        curve = _nested_curve(u, s, vh @ whitening_factor(_check_gram(gram, w.shape[1]))[0])
    r = s.shape[0] if rank is None else check_rank(rank, "rank", s.shape[0], f"min(M, N) = {s.shape[0]}")
    return WhitenedSVD(u[:, :r], s[:r], vh[:r], curve, 0.0)


def _nested_curve(u: torch.Tensor, s: torch.Tensor, m: torch.Tensor, relative: bool = True) -> torch.Tensor:
    """||sum_{i>k} s_i u_i m_i^T||^2 for every k = 0..r (divided by its value at k = 0 when
    ``relative``); u, m need not be orthonormal: the Gram matrix of the rank-one terms in the
    Frobenius product, summed over its trailing square blocks by a reversed 2-D cumsum."""
    terms = (u * s).T  # (r, M)
    gram = (terms @ terms.T) * (m @ m.T)  # <term_i, term_j>
    blocks = torch.flip(torch.flip(gram, (0, 1)).cumsum(0).cumsum(1), (0, 1))
    tails = torch.cat([blocks.diagonal(), gram.new_zeros(1)]).clamp_min(0.0)
    if not relative:
        return tails
    return tails / tails[0] if float(tails[0]) > 0 else torch.zeros_like(tails)


def output_error_curve(weight: torch.Tensor, gram: torch.Tensor, method: str = "whiten",
                       scale: torch.Tensor | None = None, *, row_energy: torch.Tensor | None = None,
                       relative: bool = True, row_weights: torch.Tensor | None = None,
                       alpha: float = 0.5) -> torch.Tensor:
    """Squared output error ||D (W - W^_k) X^T||^2 of the rank-k approximation of ``method``
    (``whiten``: the optimum; ``asvd``: needs ``scale``, exponent ``alpha``; ``fwsvd``: needs ``row_weights``) for
    k = 0 .. min(M, N), where
    ``gram`` = X^T X and D = diag(sqrt(``row_energy``)) weighs the output channels (M,) >= 0
    (None: all 1). ``relative``: divided by the error at rank 0 (the output energy). (min(M,
    N) + 1,) float64, decreasing to 0."""
    check_choice(method, "method", ("whiten", "asvd", "fwsvd"))
    if method == "asvd":
        if scale is None:
            raise ValueError("output_error_curve(method='asvd') needs scale= (mean |x| per channel)")
        res = asvd(weight, scale, alpha=alpha, gram=gram)
    elif method == "fwsvd":
        if row_weights is None:
            raise ValueError("output_error_curve(method='fwsvd') needs row_weights= (one per output channel)")
        res = row_weighted_svd(weight, row_weights, gram=gram)
    else:
        res = whitened_svd(weight, gram)
    if row_energy is None and relative:
        return res.curve
    w = _weight(weight)
    d = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
    if row_energy is not None:
        e = check_tensor(row_energy, "row_energy", min_dim=1, finite=True).to(d)
        if e.shape != d.shape or bool((e < 0).any()):
            raise ValueError(f"row_energy must be ({w.shape[0]},) and >= 0 (one weight per output "
                             f"channel), got shape {tuple(e.shape)}")
        d = e.sqrt()
    t_g = whitening_factor(_check_gram(gram, w.shape[1]))[0]
    return _nested_curve(res.U * d[:, None], res.S, res.Vh @ t_g, relative)


def reduced_rank_regression(gram: torch.Tensor, cross: torch.Tensor, rank: int | None = None, *,
                            ridge: float = 0.0) -> torch.Tensor:
    """The B (K, T) of rank <= ``rank`` minimising ||Z B - Y||_F given ``gram`` = Z^T Z (K, K)
    and ``cross`` = Z^T Y (K, T): least squares B0 = (G + ridge mean(diag G) I)^-1 C, then the
    whitened SVD of B0^T in the metric of G (the same mechanism as :func:`whitened_svd`; the
    fitted outputs' top principal directions). ``rank`` None: plain least squares."""
    g = _check_gram(gram, gram.shape[0] if gram.dim() == 2 else -1)
    c = check_tensor(cross, "cross", min_dim=2, finite=True).to(torch.float64)
    if c.shape[0] != g.shape[0]:
        raise ValueError(f"cross must have {g.shape[0]} rows (Z^T Y), got shape {tuple(c.shape)}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    b0 = torch.linalg.solve(g + ridge * float(g.diagonal().mean()) * eye, c)
    if rank is None or rank >= min(b0.shape):
        return b0
    return whitened_svd(b0.T, g, rank).to_tensor().T

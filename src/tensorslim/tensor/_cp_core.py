"""Building blocks that CP-ALS (``cp.py``) and CPD-EPC (``cp_epc.py``) share (not public API):
the normal-equation solve, the Hadamard product of Grams, the exact fit, the canonical order."""
from __future__ import annotations

import torch

from ._common import fix_signs
from .ops import khatri_rao
from .results import CPTensor

SINGULAR = 1e4 * torch.finfo(torch.float64).eps  # relative eigenvalue floor of the normal eqs


def solve_normal(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``m @ inv(v)`` for the symmetric PSD (R, R) ``v`` (float64) by Cholesky; returns ``m``'s
    dtype. When ``v`` is singular to working precision (a Cholesky pivot^2 below
    ``SINGULAR * max diag(v)``: e.g. rank > what the tensor supports, or a size-1 mode whose
    (1, R) factor makes its Gram rank one), the minimum-norm solution ``m @ pinv(v)`` drops the
    null directions instead: any tiny pivot or ridge would amplify rounding noise in ``m``
    along them into huge, mutually cancelling columns."""
    scale = float(v.diagonal().max())
    if scale > 0.0:
        chol, info = torch.linalg.cholesky_ex(v)
        if int(info) == 0 and float(chol.diagonal().min()) ** 2 > SINGULAR * scale:
            return (m.to(v.dtype) @ torch.cholesky_inverse(chol)).to(m.dtype)
    return (m.to(v.dtype) @ torch.linalg.pinv(v, rtol=SINGULAR, hermitian=True)).to(m.dtype)


def hadamard_all(grams: list[torch.Tensor], skip: int) -> torch.Tensor:
    """Hadamard product of all Grams except ``grams[skip]`` (skip=-1: of all of them)."""
    out = None
    for i, g in enumerate(grams):
        if i != skip:
            out = g.clone() if out is None else out * g
    return out


def exact_error(
    t: torch.Tensor, weights: torch.Tensor, factors: list[torch.Tensor], norm_sq: float
) -> float:
    """||X - X^|| / ||X|| by rebuilding X^ = (F_0 w) @ khatri_rao(F_1..).T."""
    rebuilt = (factors[0] * weights) @ khatri_rao(factors[1:]).transpose(0, 1)
    diff = t.reshape(t.shape[0], -1) - rebuilt
    return float(torch.linalg.vector_norm(diff, dtype=torch.float64)) / norm_sq ** 0.5


def finalize(
    weights: torch.Tensor, factors: list[torch.Tensor], errors: tuple[float, ...]
) -> CPTensor:
    """Sort components by weight (descending) and fix signs: the largest-|.| entry of every
    column of factors 0..N-2 is positive, the sign going into the last factor."""
    order = torch.argsort(weights, descending=True, stable=True)
    weights = weights[order]
    factors = [f[:, order] for f in factors]
    total = torch.ones_like(weights)
    for n in range(len(factors) - 1):
        s = fix_signs(factors[n])
        factors[n] = factors[n] * s
        total = total * s
    factors[-1] = factors[-1] * total
    return CPTensor(weights=weights, factors=tuple(factors), errors=errors)

"""Tensor algebra primitives (Kolda & Bader 2009) on torch tensors.

Conventions follow tensorly: the mode-``n`` unfolding of ``X`` (I_0, ..., I_{N-1}) is
``moveaxis(X, n, 0).reshape(I_n, -1)`` (C order, so among the remaining modes the last one
varies fastest), and ``khatri_rao`` lets its *first* matrix vary slowest, so that for a CP
tensor ``unfold(X, n) == F_n @ diag(w) @ khatri_rao([F_k for k != n]).T``.

Every function here works for any floating dtype and any device and never copies to numpy.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from ._common import check_mode, check_tensor

__all__ = [
    "unfold",
    "fold",
    "mode_dot",
    "multi_mode_dot",
    "kron",
    "khatri_rao",
    "hadamard",
    "rel_error",
]


# --------------------------------------------------------------------------- unfold / fold
def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: (I_0, ..., I_{N-1}) -> (I_mode, prod of the other I_k)."""
    check_tensor(t, "t", min_dim=1, floating=False)
    mode = check_mode(mode, t.dim())
    return torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)


def fold(m: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: (I_mode, prod others) -> ``shape``."""
    check_tensor(m, "m", floating=False)
    shape = tuple(int(s) for s in shape)
    mode = check_mode(mode, len(shape))
    if m.dim() != 2 or m.shape[0] != shape[mode] or m.numel() != prod(shape):
        raise ValueError(
            f"m of shape {tuple(m.shape)} is not a mode-{mode} unfolding of shape {shape}; "
            f"expected ({shape[mode]}, {prod(shape) // max(shape[mode], 1)})"
        )
    rest = shape[:mode] + shape[mode + 1:]
    return torch.movedim(m.reshape((shape[mode],) + rest), 0, mode)


# --------------------------------------------------------------------------- n-mode products
def mode_dot(t: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """n-mode product ``t x_mode matrix``.

    ``t`` (I_0, ..., I_mode, ..., I_{N-1}), ``matrix`` (J, I_mode) -> (I_0, ..., J, ..., I_{N-1}).
    A 1-D ``matrix`` (I_mode,) contracts the mode away.
    """
    check_tensor(t, "t", min_dim=1, floating=False)
    check_tensor(matrix, "matrix", min_dim=1, floating=False)
    mode = check_mode(mode, t.dim())
    if matrix.dim() > 2 or matrix.shape[-1] != t.shape[mode]:
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} cannot multiply mode {mode} of a tensor of "
            f"shape {tuple(t.shape)}; expected (J, {t.shape[mode]}) or ({t.shape[mode]},)"
        )
    out = torch.tensordot(t, matrix, dims=([mode], [matrix.dim() - 1]))
    if matrix.dim() == 1:
        return out
    return torch.movedim(out, -1, mode)


def multi_mode_dot(
    t: torch.Tensor,
    matrices: Sequence[torch.Tensor],
    modes: Sequence[int] | None = None,
    *,
    transpose: bool = False,
) -> torch.Tensor:
    """``t x_{modes[0]} matrices[0] x_{modes[1]} matrices[1] ...``.

    ``modes`` defaults to ``range(len(matrices))``. With ``transpose=True`` each matrix is
    used transposed (``matrices[i]`` (I_{modes[i]}, J_i)), the projection onto the factors.
    """
    check_tensor(t, "t", min_dim=1, floating=False)
    matrices = list(matrices)
    modes = list(range(len(matrices))) if modes is None else [check_mode(m, t.dim(), "modes")
                                                               for m in modes]
    if len(modes) != len(matrices):
        raise ValueError(f"got {len(matrices)} matrices but {len(modes)} modes; "
                         "give one mode per matrix")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct, got {modes}")
    out = t
    for matrix, mode in zip(matrices, modes):
        out = mode_dot(out, matrix.transpose(0, 1) if transpose and matrix.dim() == 2 else matrix,
                       mode)
    return out


# --------------------------------------------------------------------------- products
def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of matrices (m, n) x (p, q) -> (m p, n q).

    ``out[i p + k, j q + l] = a[i, j] * b[k, l]``.
    """
    check_tensor(a, "a", floating=False)
    check_tensor(b, "b", floating=False)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"kron expects two matrices, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return torch.kron(a, b)


def khatri_rao(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product; the first matrix varies slowest.

    ``matrices[k]`` (I_k, R) -> (prod I_k, R) with
    ``out[(i_0, ..., i_K) row-major, r] = prod_k matrices[k][i_k, r]``.
    """
    matrices = list(matrices)
    if not matrices:
        raise ValueError("khatri_rao needs at least one matrix, got an empty sequence")
    for i, m in enumerate(matrices):
        check_tensor(m, f"matrices[{i}]", floating=False)
        if m.dim() != 2:
            raise ValueError(f"matrices[{i}] must be a matrix (I, R), got shape {tuple(m.shape)}")
    rank = matrices[0].shape[1]
    if any(m.shape[1] != rank for m in matrices):
        raise ValueError("all matrices must have the same number of columns, got "
                         f"{[int(m.shape[1]) for m in matrices]}")
    out = matrices[0]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, rank)
    return out


def hadamard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hadamard (element-wise) product ``a * b`` of two tensors of the same shape."""
    check_tensor(a, "a", floating=False)
    check_tensor(b, "b", floating=False)
    if a.shape != b.shape:
        raise ValueError(f"hadamard needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a * b


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b||_F / ||a||_F`` (``a`` is the reference), computed in float64."""
    check_tensor(a, "a", floating=False)
    check_tensor(b, "b", floating=False)
    if a.shape != b.shape:
        raise ValueError(f"rel_error needs equal shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a64 = a.detach().to(torch.float64)
    num = torch.linalg.vector_norm(a64 - b.detach().to(torch.float64))
    den = torch.linalg.vector_norm(a64)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)

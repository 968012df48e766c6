"""Small frozen result types returned by the decompositions.

Every result holds torch tensors (never copies them to numpy), rebuilds the full tensor with
``.to_tensor()``, counts its stored numbers with ``.num_params()`` and keeps ``errors``: the
relative approximation error ||X - X^|| / ||X|| after each iteration (one entry for
non-iterative methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch


@dataclass(frozen=True, eq=False)
class SVDResult:
    """Truncated SVD ``M ~= U @ diag(S) @ Vh``.

    Shapes: ``U`` (m, r), ``S`` (r,), ``Vh`` (r, n).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    errors: tuple[float, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    def to_tensor(self) -> torch.Tensor:
        return (self.U * self.S) @ self.Vh

    def num_params(self) -> int:
        # S folds into either factor, so it is not counted separately.
        return self.U.numel() + self.Vh.numel()


@dataclass(frozen=True, eq=False)
class CPTensor:
    """CP (CANDECOMP/PARAFAC) tensor ``X ~= sum_r w_r a1_r o a2_r o ... o aN_r``.

    ``weights`` (R,), ``factors[n]`` (I_n, R); columns of the factors have unit norm.
    """

    weights: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    errors: tuple[float, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(f.shape[0]) for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        """The full tensor, as one matmul: the largest mode's weighted factor times the
        Khatri-Rao product of the others (prod of the other dims x R). A left-to-right einsum
        builds (I_0, ..., I_{N-1}, R) intermediates instead: 10.7 GB in float64 for a
        512x512x3x3 kernel at rank 570."""
        from .ops import khatri_rao

        shape = [int(f.shape[0]) for f in self.factors]
        big = max(range(len(shape)), key=lambda i: shape[i])
        rest = [f for i, f in enumerate(self.factors) if i != big]
        lead = self.factors[big] * self.weights
        if not rest:
            return lead.sum(1)
        flat = lead @ khatri_rao(rest).transpose(0, 1)  # (I_big, prod of the others)
        others = [d for i, d in enumerate(shape) if i != big]
        return flat.reshape(shape[big], *others).movedim(0, big)

    def num_params(self) -> int:
        return sum(f.numel() for f in self.factors)


@dataclass(frozen=True, eq=False)
class TuckerTensor:
    """(Partial) Tucker tensor ``X ~= G x_{m1} U_1 x_{m2} U_2 ...`` over ``modes``.

    ``core`` has the shape of X with each decomposed mode ``m`` replaced by its rank;
    ``factors[i]`` is (I_{modes[i]}, rank_i) with orthonormal columns.
    Modes not in ``modes`` are kept whole (Tucker-2 of a conv kernel: modes (0, 1)).
    """

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    modes: tuple[int, ...]
    errors: tuple[float, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(f.shape[1]) for f in self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.core.shape)
        for f, m in zip(self.factors, self.modes):
            shape[m] = int(f.shape[0])
        return tuple(shape)

    def to_tensor(self) -> torch.Tensor:
        from .ops import multi_mode_dot

        return multi_mode_dot(self.core, self.factors, self.modes)

    def num_params(self) -> int:
        return self.core.numel() + sum(f.numel() for f in self.factors)


@dataclass(frozen=True, eq=False)
class TTTensor:
    """Tensor-Train ``X[i1..id] = G1[:, i1, :] @ ... @ Gd[:, id, :]``.

    ``cores[k]`` is (r_{k-1}, I_k, r_k) with r_0 = r_d = 1.
    """

    cores: tuple[torch.Tensor, ...]
    errors: tuple[float, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1,) + tuple(int(c.shape[2]) for c in self.cores)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    def to_tensor(self) -> torch.Tensor:
        out = self.cores[0].reshape(self.cores[0].shape[1], -1)
        for core in self.cores[1:]:
            out = out @ core.reshape(core.shape[0], -1)
            out = out.reshape(-1, core.shape[2])
        return out.reshape(self.shape)

    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)


@dataclass(frozen=True, eq=False)
class TTMatrix:
    """TT-matrix of an (M, N) matrix with ``M = prod(out_modes)``, ``N = prod(in_modes)``.

    ``cores[k]`` is (r_{k-1}, out_modes[k], in_modes[k], r_k), r_0 = r_d = 1, so that
    ``W[(i1..id), (j1..jd)] = G1[:, i1, j1, :] @ ... @ Gd[:, id, jd, :]`` (row-major
    multi-indices, matching ``W.reshape(out_modes + in_modes)``).
    """

    cores: tuple[torch.Tensor, ...]
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    errors: tuple[float, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1,) + tuple(int(c.shape[3]) for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return prod(self.out_modes), prod(self.in_modes)

    def to_tensor(self) -> torch.Tensor:
        d = len(self.cores)
        out = self.cores[0]  # (1, m1, n1, r1)
        for core in self.cores[1:]:
            out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
        out = out.reshape([*[s for c in self.cores for s in c.shape[1:3]]])
        # axes now (m1, n1, m2, n2, ...): bring all m's first, then n's.
        perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return out.permute(perm).reshape(self.shape)

    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

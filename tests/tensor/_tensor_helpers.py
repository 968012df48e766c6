"""Builders of tensors with exactly known CP / Tucker / TT rank (float64 by default)."""
from __future__ import annotations

import torch

from tensorslim.tensor import CPTensor, TTTensor, TuckerTensor


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def known_cp(shape, rank, *, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = gen(seed)
    factors = tuple(torch.randn(s, rank, generator=g, dtype=dtype) for s in shape)
    weights = torch.rand(rank, generator=g, dtype=dtype) + 0.5
    return CPTensor(weights=weights, factors=factors).to_tensor()


def known_tucker(shape, ranks, modes=None, *, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = gen(seed)
    modes = tuple(range(len(shape))) if modes is None else tuple(modes)
    core_shape = list(shape)
    for m, r in zip(modes, ranks):
        core_shape[m] = r
    core = torch.randn(core_shape, generator=g, dtype=dtype)
    factors = tuple(torch.linalg.qr(torch.randn(shape[m], r, generator=g, dtype=dtype)).Q
                    for m, r in zip(modes, ranks))
    return TuckerTensor(core=core, factors=factors, modes=modes).to_tensor()


def known_tt(shape, ranks, *, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = gen(seed)
    full = (1, *ranks, 1)
    cores = tuple(torch.randn(full[k], s, full[k + 1], generator=g, dtype=dtype)
                  for k, s in enumerate(shape))
    return TTTensor(cores=cores).to_tensor()


def noisy(x: torch.Tensor, level: float, seed: int = 1) -> torch.Tensor:
    n = torch.randn(x.shape, generator=gen(seed), dtype=x.dtype)
    return x + level * n * x.norm() / n.norm()

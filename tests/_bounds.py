"""Reference numbers the compression tests compare against: the kernel a factorized layer
applies, and the Eckart-Young floor on the weight error of a kernel of a given rank."""
from __future__ import annotations

from typing import Any

import torch


def kernel(layer: Any) -> torch.Tensor:
    """The dense kernel a factorized layer applies, rebuilt from its exact decomposition
    (flattened, groups stacked along the output channels)."""
    for name in ("to_tucker", "to_cp", "to_svd"):
        if hasattr(layer, name):
            parts = getattr(layer, name)()
            parts = parts if isinstance(parts, list) else [parts]
            return torch.cat([p.to_tensor().reshape(-1) for p in parts])
    raise AssertionError(f"no exact decomposition on {type(layer).__name__}")


def unfold_rank(rank: Any) -> int:
    """Rank of the output-channel unfolding of a kernel of this layer rank (all groups):
    Tucker-2's (r_in, r_out) gives r_out, CP's and SVD's int is itself."""
    return int(rank[1]) if isinstance(rank, (tuple, list)) else int(rank)


def eckart_young(w: torch.Tensor, groups: int, rank: int) -> float:
    """Smallest ``||W - W^|| / ||W||`` over kernels whose per-group output unfolding has rank
    ``rank / groups``: the discarded singular values of each group's (T/g, rest) matrix."""
    w = w.detach().double()
    tail = 0.0
    for wg in w.chunk(groups):
        s = torch.linalg.svdvals(wg.reshape(wg.shape[0], -1))
        tail += float((s[rank // groups:] ** 2).sum())
    return (tail / float((w ** 2).sum())) ** 0.5

"""What the Tensor-Train layers (``TTLinear``, ``TTConv2d``) share: balanced mode
factorisation, the exact (full) TT-ranks of a chain of modes, rank clipping and the
from-scratch initialisation of a chain of cores."""
from math import prod
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .base import nearest_rank

INITS = ("dense", "glorot")


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Balanced factorisation of ``n`` into ``d`` non-decreasing integers (product exactly n).

    Minimises the largest factor, then the sum. Examples: factorize(4096, 3) == (16, 16, 16),
    factorize(768, 3) == (8, 8, 12), factorize(10, 3) == (1, 2, 5).
    """
    if n < 1 or d < 1:
        raise ValueError(f"factorize: n={n} and d={d} must be >= 1")
    best: Optional[tuple[int, ...]] = None

    def key(t: tuple[int, ...]) -> tuple[int, int]:
        return (max(t), sum(t))

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                if best is None or key(cand) < key(best):
                    best = cand
            return
        f = lo
        while f ** k <= rest:
            if rest % f == 0:
                rec(rest // f, k - 1, f, acc + (f,))
            f += 1

    rec(n, d, 1, ())
    if best is None:  # unreachable: (1, ..., 1, n) always qualifies
        raise ValueError(f"factorize: no factorisation of n={n} into d={d} factors")
    return best


def check_modes(layer: str, features: int, modes: Optional[Sequence[int]], d: int,
                name: str) -> tuple[int, ...]:
    """``modes`` (default ``factorize(features, d)``) validated: positive, product ``features``."""
    if modes is None:
        return factorize(features, d)
    out = tuple(int(m) for m in modes)
    if not out or min(out) < 1 or prod(out) != features:
        raise ValueError(f"{layer}: {name}={tuple(modes)} must be positive ints whose product is "
                         f"{features}")
    return out


def chain_caps(sizes: Sequence[int]) -> list[int]:
    """The exact TT-ranks of a generic tensor of shape ``sizes``: bond k joins sizes[:k] to
    sizes[k:], so its rank is at most min(prod(sizes[:k]), prod(sizes[k:]))."""
    return [min(prod(sizes[:k]), prod(sizes[k:])) for k in range(1, len(sizes))]


def max_tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> list[int]:
    """Largest useful internal TT-ranks r_1..r_{d-1} (those of an exact TT of any matrix)."""
    return chain_caps([m * n for m, n in zip(out_modes, in_modes)])


def clip_ranks(layer: str, rank: Any, caps: Sequence[int]) -> tuple[int, ...]:
    """Ranks per bond from an int bound or a tuple of ``len(caps)`` ints, each clipped to its
    bond's cap (the exact TT-rank). TypeError / ValueError for anything else or a rank < 1."""
    if isinstance(rank, bool) or not isinstance(rank, (int, tuple, list)):
        raise TypeError(f"{layer}: ranks must be an int or a tuple of {len(caps)} ints, got {rank!r}")
    ranks = [rank] * len(caps) if isinstance(rank, int) else list(rank)
    if len(ranks) != len(caps):
        raise ValueError(f"{layer}: ranks={tuple(ranks)} must be an int or {len(caps)} interior "
                         f"TT-ranks (one per bond; caps {tuple(caps)})")
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{layer}: TT-rank r_{k}={r!r} must be an int >= 1")
    return tuple(min(int(r), c) for r, c in zip(ranks, caps))


def nearest_ranks(layer: str, rank: Any, caps: Sequence[int]) -> Any:
    """``valid_rank`` of a TT layer: a number -> the nearest int in [1, max(caps)]; a sequence
    of ``len(caps)`` numbers -> each rounded and clipped to its bond's cap."""
    if isinstance(rank, (list, tuple)):
        if len(rank) != len(caps):
            raise ValueError(f"{layer}: ranks={tuple(rank)} must be a number or {len(caps)} "
                             f"interior TT-ranks")
        return tuple(nearest_rank(layer, f"r_{k}", r, c) for k, (r, c) in enumerate(zip(rank, caps)))
    return nearest_rank(layer, "rank", rank, max(caps, default=1))


def tt_init_(cores: Sequence[Tensor], ranks: Sequence[int], variance: float) -> None:
    """Gaussian cores whose product has entries of variance ``variance`` (t3f's rule):
    std = variance^(1/(2n)) * prod(r_k)^(-1/(2n)) for n cores and interior ranks r_k; an entry
    of the product is a sum of prod(r_k) products of n independent entries."""
    n = len(cores)
    std = (variance / prod(ranks)) ** (0.5 / n)
    with torch.no_grad():
        for core in cores:
            core.normal_(0.0, std)


def init_variance(layer: str, init: str, fan_in: int, fan_out: int) -> float:
    """Target weight variance: ``dense`` = 1/(3 fan_in), the default init of ``nn.Linear`` /
    ``nn.Conv2d``; ``glorot`` = 2/(fan_in + fan_out) (Glorot & Bengio; t3f's default)."""
    if init == "dense":
        return 1.0 / (3.0 * fan_in)
    if init == "glorot":
        return 2.0 / (fan_in + fan_out)
    raise ValueError(f"{layer}: init={init!r} is not known; accepted: {', '.join(INITS)}")

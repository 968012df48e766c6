"""Pure rank-selection rules: approximation-error proxies, a per-layer constant compression
rate, an error-minimising whole-model budget, and a monotone bisection search.

Nothing here touches ``nn.Module``; the planner (``tensorslim.planning.rules``) feeds these
functions with weights, rank candidates and costs.

Error proxies (squared relative error ||W - W^||^2 / ||W||^2, from SVDs computed once):

* ``svd``: the energy of the dropped singular values of W reshaped (T, -1) (Eckart-Young:
  exactly the truncated-SVD error).
* ``tucker`` (r_in, r_out): dropped energy of the mode-1 unfolding beyond r_in plus that of the
  mode-0 unfolding beyond r_out -- the truncated-HOSVD error bound (De Lathauwer et al. 2000),
  which HOOI only improves on.
* ``cp`` R: CP has no nested optimal truncation, so no cheap exact value exists; the proxy is
  the midpoint of a lower and an upper bound on the best rank-R CP error. Lower: the largest
  dropped energy over the unfoldings of every mode beyond R (a rank-R CP tensor has every
  unfolding of rank <= R). Upper: the smallest over modes n of the dropped energy of unfolding
  n beyond floor(R / c_n), c_n = an upper bound on the CP rank of a tensor shaped like the
  other modes (min over those modes of the product of the rest; 9 for a 3x3 kernel slice):
  every rank-one term of the truncated SVD of unfolding n is then a CP of rank <= c_n. The
  midpoint keeps decreasing with R beyond the largest mode, where the lower bound is 0.
* ``tt`` max rank r: the sum over the d - 1 TT-SVD unfoldings of the dropped energy beyond r,
  the TT-SVD error bound (Oseledets 2011).
* ``filtercp`` R (NORTON: a rank-R CP of every filter (S/g, *k) on its own): the ``cp`` proxy
  of each filter, weighted by the filter's share of the energy (the filters' errors add).

Grouped convs are decomposed per group, so every proxy is the energy-weighted sum over groups
with the rank split evenly.
"""
from __future__ import annotations

import math
from math import prod
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["tail_energy", "error_proxies", "constant_rate_index", "min_error_allocation",
           "smallest_passing"]

ERROR_METHODS = ("svd", "tucker", "cp", "tt", "filtercp")


def tail_energy(m: torch.Tensor) -> torch.Tensor:
    """``t[k]`` = energy of the singular values of ``m`` beyond the first ``k``, divided by
    ||m||^2, for k = 0 .. min(m.shape) (so t[0] = 1, t[-1] = 0). ``m`` (L, M) -> (min(L,M)+1,)."""
    s2 = torch.linalg.svdvals(m.detach().to(torch.float64)) ** 2
    total = s2.sum()
    if total <= 0:
        return torch.zeros(s2.numel() + 1, dtype=torch.float64)
    tail = torch.flip(torch.cumsum(torch.flip(s2, (0,)), 0), (0,)) / total
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0.0)


def _at(t: torch.Tensor, k: int) -> float:
    return float(t[min(max(int(k), 0), t.numel() - 1)])


def _tt_unfoldings(w: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> list[torch.Tensor]:
    """The unfoldings whose tail energies bound a TT-SVD's error: a Linear weight (M, N) as
    the TT-matrix of TTLinear (mode pairs in order); a conv kernel (T/g, S/g, *k) as
    TTConv2d's chain (the spatial mode first, then the channel mode pairs last to first)."""
    d = len(in_modes)
    pairs = [out_modes[k] * in_modes[k] for k in range(d)]
    if w.dim() > 2:
        k2 = prod(w.shape[2:])
        perm = [2 * d] + [i for k in reversed(range(d)) for i in (k, d + k)]
        t, sizes = w.reshape(*out_modes, *in_modes, k2).permute(perm), [k2] + pairs[::-1]
    else:
        perm = [i for k in range(d) for i in (k, d + k)]
        t, sizes = w.reshape(tuple(out_modes) + tuple(in_modes)).permute(perm), pairs
    t = t.reshape(sizes)
    return [t.reshape(prod(sizes[: k + 1]), -1) for k in range(len(sizes) - 1)]


def _max_rank(dims: Sequence[int]) -> int:
    """An upper bound on the CP rank of any tensor of shape ``dims``: min over modes of the
    product of the other dims (a sum of that many rank-one slices)."""
    if len(dims) <= 1:
        return 1
    return min(prod(dims) // d for d in dims)


def _batch_tails(t: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`tail_energy` of the mode-``n`` unfolding of every tensor of the batch ``t``
    (B, *dims) -> (B, min(rows, cols) + 1)."""
    d = t.shape[1 + n]
    m = t.movedim(1 + n, 1).reshape(t.shape[0], d, -1)
    s2 = torch.linalg.svdvals(m) ** 2
    total = s2.sum(1, keepdim=True)
    tail = torch.flip(torch.cumsum(torch.flip(s2, (1,)), 1), (1,)) / total.clamp_min(1e-300)
    tail = torch.where(total > 0, tail, torch.zeros_like(tail))
    return torch.cat([tail, tail.new_zeros(t.shape[0], 1)], 1).clamp_min(0.0)


def _cp_proxy(t: torch.Tensor, ranks: Sequence[Any]) -> torch.Tensor:
    """The ``cp`` proxy (module doc) of every tensor of the batch ``t`` (B, *dims) at each
    rank: (B, len(ranks)), float64."""
    dims = t.shape[1:]
    tails = [_batch_tails(t, n) for n in range(len(dims))]
    spans = [_max_rank([d for j, d in enumerate(dims) if j != n]) for n in range(len(dims))]

    def col(tl: torch.Tensor, k: int) -> torch.Tensor:
        return tl[:, min(max(int(k), 0), tl.shape[1] - 1)]

    out = []
    for r in ranks:
        lower = torch.stack([col(tl, r) for tl in tails]).amax(0)
        upper = torch.stack([col(tl, int(r) // c) for tl, c in zip(tails, spans)]).amin(0)
        out.append((lower + upper) / 2)
    return torch.stack(out, 1)


def _group_proxy(w: torch.Tensor, method: str, ranks: Sequence[Any], g: int,
                 options: dict) -> list[float]:
    """Proxies of one group's kernel ``w`` for per-group ``ranks``."""
    from ..tensor import unfold

    if method == "svd":
        t = tail_energy(w.reshape(w.shape[0], -1))
        return [_at(t, r) for r in ranks]
    if method == "tucker":
        t_in, t_out = tail_energy(unfold(w, 1)), tail_energy(unfold(w, 0))
        return [_at(t_in, r[0]) + _at(t_out, r[1]) for r in ranks]
    if method == "cp":
        return _cp_proxy(w.unsqueeze(0), ranks)[0].tolist()
    if method == "filtercp":
        if w.dim() < 3:
            raise ValueError(f"filtercp decomposes conv filters; got a weight of shape {tuple(w.shape)}")
        energy = (w * w).flatten(1).sum(1)
        share = energy / energy.sum().clamp_min(1e-300)
        return (share[:, None] * _cp_proxy(w, ranks)).sum(0).tolist()
    if method == "tt":
        tails = [tail_energy(u) for u in _tt_unfoldings(w, options["in_modes"], options["out_modes"])]
        return [sum(_at(t, r) for t in tails) for r in ranks]
    raise ValueError(f"no error proxy for method {method!r}; known: {', '.join(ERROR_METHODS)}")


def error_proxies(weight: torch.Tensor, method: str, ranks: Sequence[Any], groups: int = 1,
                  **options: Any) -> list[float]:
    """Squared relative approximation-error proxy of ``weight`` for each rank in ``ranks``
    (see the module docstring). ``weight``: conv (T, S/g, *k) or Linear (M, N); tucker ranks
    are (r_in, r_out) totals over the ``groups``; tt needs ``in_modes`` / ``out_modes``."""
    w = weight.detach().to(torch.float64)
    total = float((w * w).sum())
    if total == 0.0:
        return [0.0 for _ in ranks]

    def per_group(r: Any) -> Any:
        if method == "tt":  # TT ranks are per group already
            return r
        return tuple(x // groups for x in r) if isinstance(r, (tuple, list)) else int(r) // groups

    out = np.zeros(len(ranks))
    for wg in w.chunk(groups, dim=0) if groups > 1 else [w]:
        share = float((wg * wg).sum()) / total
        out += share * np.asarray(_group_proxy(wg, method, [per_group(r) for r in ranks], groups, options))
    return [float(x) for x in out]


def constant_rate_index(costs: Sequence[int], dense: int, rate: float) -> int | None:
    """Index of the most expensive candidate with ``cost <= dense / rate`` (``costs`` sorted
    ascending), or None when even the cheapest is above it."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 1.0 or math.isinf(rate):
        raise ValueError(f"rate must be a finite number >= 1 (dense params / compressed params), got {rate!r}")
    limit = dense / rate
    best = None
    for i, c in enumerate(costs):
        if c <= limit * (1 + 1e-12):
            best = i
    return best


def _pick(costs: list[np.ndarray], errs: list[np.ndarray], lam: float) -> list[int]:
    return [int(np.argmin(e + lam * c)) for c, e in zip(costs, errs)]


def _total(costs: list[np.ndarray], idx: Sequence[int]) -> float:
    return float(sum(c[i] for c, i in zip(costs, idx)))


def min_error_allocation(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
                         budget: float, weights: Sequence[float] | None = None) -> list[int]:
    """Choose one option per layer minimising ``sum_l w_l * errors[l][i_l]`` subject to
    ``sum_l costs[l][i_l] <= budget``.

    Each layer's options are sorted by cost (e.g. its rank candidates, then "dense" with error
    0). A Lagrangian relaxation (per layer argmin of ``w e + lambda c``, lambda bisected on a log
    scale) lands on the lower convex hull of the trade-off just under the budget; the slack is
    then filled greedily by the upgrade with the largest weighted error decrease per unit of
    cost that still fits. Returns the chosen option index per layer.
    Raises ValueError when the cheapest options together exceed ``budget``.
    """
    if weights is None:
        weights = [1.0] * len(costs)
    if len(weights) != len(costs) or len(errors) != len(costs):
        raise ValueError(f"costs ({len(costs)}), errors ({len(errors)}) and weights "
                         f"({len(weights)}) need one entry per layer")
    if any(not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"layer weights must be finite numbers >= 0, got {list(weights)}")
    scale = max(budget, 1.0)
    c = [np.asarray(x, dtype=np.float64) / scale for x in costs]
    e = [np.asarray(x, dtype=np.float64) * w for x, w in zip(errors, weights)]
    limit = budget / scale
    cheapest = [int(np.argmin(x)) for x in c]
    if _total(c, cheapest) > limit * (1 + 1e-9):
        raise ValueError(f"the budget {budget:g} is below the cheapest choice of every layer "
                         f"({_total(c, cheapest) * scale:g})")
    lo, hi = -30.0, 30.0  # log10 lambda; large lambda -> cheapest options
    if _total(c, _pick(c, e, 10.0 ** lo)) <= limit:
        idx = _pick(c, e, 10.0 ** lo)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if _total(c, _pick(c, e, 10.0 ** mid)) <= limit:
                hi = mid
            else:
                lo = mid
        idx = _pick(c, e, 10.0 ** hi)
        if _total(c, idx) > limit:
            idx = cheapest
    return _fill(c, e, idx, limit)


def _fill(c: list[np.ndarray], e: list[np.ndarray], idx: list[int], limit: float) -> list[int]:
    """Greedy slack filling: the upgrade with the best weighted error decrease per cost that
    fits, until none fits; upgrades that keep the error (ties, ratio 0) take the cheapest step,
    so the budget is used up (a larger rank never hurts the real error)."""
    idx = list(idx)
    current = _total(c, idx)
    for _ in range(100_000):
        best, best_key = None, None
        for l, (cl, el) in enumerate(zip(c, e)):
            dc = cl - cl[idx[l]]
            de = el[idx[l]] - el
            ok = (dc > 0) & (de >= 0) & (current + dc <= limit * (1 + 1e-12))
            if not ok.any():
                continue
            ratio = np.where(ok, de / np.where(dc > 0, dc, 1.0), -np.inf)
            ties = np.flatnonzero(ok & (ratio == ratio.max()))
            j = int(ties[np.argmin(dc[ties])])
            key = (float(ratio[j]), -float(dc[j]))
            if best_key is None or key > best_key:
                best, best_key = (l, j), key
        if best is None:
            return idx
        l, j = best
        current += float(c[l][j] - c[l][idx[l]])
        idx[l] = j
    return idx


def smallest_passing(n: int, ok: Callable[[int], bool]) -> int | None:
    """Smallest ``i`` in [0, n) with ``ok(i)``, for ``ok`` monotone (False ... False True ...
    True), by bisection; None when ``ok(n - 1)`` is False. Calls ``ok`` about log2(n) + 1 times."""
    if n <= 0 or not ok(n - 1):
        return None
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo

"""Whole-model budget: per-layer ranks so the model keeps a target fraction of its cost.

Every layer gets the largest rank whose cost is at most ``alpha`` times its dense cost, with
one global ``alpha`` found by bisection; the slack left by rank granularity is then filled
greedily (cheapest next step first) without ever crossing the target.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def solve_budget(
    layers: Sequence[Any],
    candidates: Mapping[str, Sequence[tuple[Any, tuple[int, int]]]],
    total: int,
    target: float,
    objective: int,
    kind: str = "target",
) -> dict[str, Any]:
    """Choose one candidate per layer so ``sum(cost) <= target * total``.

    Args:
        layers: planned layers, each with ``.name`` and dense ``.params`` / ``.macs``.
        candidates: per layer name, ``(rank, (params, macs))`` sorted by the objective cost,
            all cheaper than dense.
        total: the whole model's dense cost (params or MACs) including uncompressible parts.
        target: fraction of ``total`` to keep, in (0, 1].
        objective: 0 for params, 1 for MACs.
    Returns:
        layer name -> chosen rank, or a string (the reason it stays dense).
    Raises:
        ValueError: when even the smallest rank everywhere cannot reach the target; the
            message gives the best reachable ratio.
    """
    dense = {l.name: (l.params, l.macs)[objective] for l in layers}
    budget = target * total
    fixed = total - sum(dense.values())
    idx = {n: -1 for n in dense}  # -1 = dense
    reachable = fixed + sum(c[0][1][objective] if c else dense[n] for n, c in candidates.items())
    if reachable > budget * 1.0000001:
        raise ValueError(
            f"{kind}={target} is unreachable: with the smallest rank on every compressible layer the "
            f"model keeps {reachable / total:.4f} of its cost (best reachable {kind}={reachable / total:.4f})"
        )

    def cost_of(choice: Mapping[str, int]) -> float:
        return fixed + sum(
            dense[n] if i < 0 else candidates[n][i][1][objective] for n, i in choice.items()
        )

    def pick(alpha: float) -> dict[str, int]:
        out = {}
        for n, c in candidates.items():
            limit = alpha * dense[n]
            i = -1 if alpha >= 1 else max((k for k, rc in enumerate(c) if rc[1][objective] <= limit), default=0)
            out[n] = i if c else -1
        return out

    lo, hi = 0.0, 1.0
    if cost_of(pick(1.0)) <= budget:
        idx = pick(1.0)
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            if cost_of(pick(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        idx = pick(lo)
    idx = _fill(idx, candidates, dense, objective, budget, cost_of(idx))
    return {
        n: (candidates[n][i][0] if i >= 0 else "kept dense: the budget is met without compressing it")
        if candidates[n] else "no rank of this method reduces its cost"
        for n, i in idx.items()
    }


def _fill(idx: dict[str, int], candidates: Mapping, dense: Mapping[str, int], objective: int,
          budget: float, current: float) -> dict[str, int]:
    """Greedily raise ranks into the slack left under the budget (smallest step first)."""
    idx = dict(idx)
    for _ in range(10_000):
        best = None
        for n, i in idx.items():
            c = candidates[n]
            if i < 0 or i + 1 >= len(c):
                continue
            step = c[i + 1][1][objective] - c[i][1][objective]
            if current + step <= budget and (best is None or step < best[1]):
                best = (n, step)
        if best is None:
            return idx
        idx[best[0]] += 1
        current += best[1]
    return idx

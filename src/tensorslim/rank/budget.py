"""Whole-model budget: per-layer ranks so the model keeps a target fraction of its cost.

The cost is any per-candidate number: parameters, MACs or measured milliseconds. Every layer
gets the largest candidate whose cost is at most ``alpha`` times its dense cost, with one
global ``alpha`` found by bisection; the slack left by rank granularity is then filled
greedily (cheapest next step first) without ever crossing the target.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

DENSE = -1  # the index of "keep the layer dense" in a choice


def solve_budget(
    layers: Sequence[Any] | Mapping[str, float],
    candidates: Mapping[str, Sequence[tuple[Any, Any]]],
    total: float,
    target: float,
    objective: int | None = None,
    kind: str = "target",
) -> dict[str, Any]:
    """Choose one candidate per layer so ``sum(cost) <= target * total``.

    Args:
        layers: ``{name: dense cost}``; or planned layers, each with ``.name`` and dense
            ``.params`` / ``.macs``, when ``objective`` picks one of those.
        candidates: per layer name, ``(rank, cost)`` sorted by cost, all cheaper than dense;
            ``cost`` is a number, or a ``(params, MACs)`` pair indexed by ``objective``.
        total: the whole model's dense cost including the parts no candidate changes.
        target: fraction of ``total`` to keep, in (0, 1].
        objective: None for numeric costs, else 0 (params) or 1 (MACs) of the pairs.
    Returns:
        layer name -> chosen rank, or a string (the reason it stays dense).
    Raises:
        ValueError: when even the cheapest candidate everywhere cannot reach the target; the
            message gives the best reachable ratio.
    """
    pick_cost: Callable[[Any], float] = (lambda c: c) if objective is None else (lambda c: c[objective])
    if isinstance(layers, Mapping):
        dense = {str(n): float(v) for n, v in layers.items()}
    else:
        dense = {l.name: float((l.params, l.macs)[objective if objective is not None else 1]) for l in layers}
    costs = {n: [float(pick_cost(c)) for _, c in candidates.get(n, ())] for n in dense}
    idx = budget_indices(dense, costs, total, target, kind)
    return {
        n: (candidates[n][i][0] if i != DENSE else "kept dense: the budget is met without compressing it")
        if costs[n] else "no rank of this method reduces its cost"
        for n, i in idx.items()
    }


def budget_indices(dense: Mapping[str, float], costs: Mapping[str, Sequence[float]], total: float,
                   target: float, kind: str = "target") -> dict[str, int]:
    """The index of the chosen cost per layer (``DENSE`` = keep it dense) so the sum stays
    at most ``target * total``; ``costs[name]`` ascending and each below ``dense[name]``.
    ValueError (with the best reachable ratio) when the cheapest choice is over budget."""
    budget = target * total
    fixed = total - sum(dense.values())

    def cost_of(choice: Mapping[str, int]) -> float:
        return fixed + sum(dense[n] if i == DENSE else costs[n][i] for n, i in choice.items())

    reachable = cost_of({n: 0 if costs[n] else DENSE for n in dense})
    if reachable > budget * 1.0000001:
        ratio = reachable / total if total else 1.0
        raise ValueError(
            f"{kind}={target} is unreachable: with the smallest rank on every compressible layer the "
            f"model keeps {ratio:.4f} of its cost (best reachable {kind}={ratio:.4f})"
        )

    def pick(alpha: float) -> dict[str, int]:
        out = {}
        for n, c in costs.items():
            limit = alpha * dense[n]
            out[n] = DENSE if alpha >= 1 or not c else max(
                (k for k, x in enumerate(c) if x <= limit), default=0)
        return out

    alpha = 1.0
    if cost_of(pick(alpha)) > budget:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost_of(pick(mid)) <= budget else (lo, mid)
        alpha = lo
    idx = pick(alpha)
    return _fill(idx, costs, budget, cost_of(idx))


def _fill(idx: dict[str, int], costs: Mapping[str, Sequence[float]], budget: float,
          current: float) -> dict[str, int]:
    """Greedily raise ranks into the slack left under the budget (smallest step first)."""
    idx = dict(idx)
    for _ in range(10_000):
        best = None
        for n, i in idx.items():
            c = costs[n]
            if i == DENSE or i + 1 >= len(c):
                continue
            step = c[i + 1] - c[i]
            if current + step <= budget and (best is None or step < best[1]):
                best = (n, step)
        if best is None:
            return idx
        idx[best[0]] += 1
        current += best[1]
    return idx

"""Rank choice of one MUSCO stage (pure: reads weights, never changes a model).

Every compressible layer of the ORIGINAL dense model is a planning ``PlannedLayer`` (its dense module,
traced shapes and MACs); its current state is its plan spec (``keep`` = still dense, else the
method and rank it runs at now). The ``stage_ranks`` setting gives each layer a *guide* rank:

* ``"vbmf"``: the EVBMF rank (``tensorslim.rank.vbmf``) of the dense weight, or of the current
  factorized weight (``vbmf_ranks_factorized``), softened by ``factor`` as in MUSCO
  (R_new = R - factor (R - R_vbmf)). CP takes the CP rank with the parameters of the Tucker-2
  at the EVBMF ranks (EVBMF estimates matrix ranks, not CP ranks).
* a fraction f (per stage): f times the current rank of every mode (a dense layer: the planning
  fraction rank).
* a mapping {layer name: rank}: the ranks to end at (a one-shot plan's, say), so that
  multi-stage and one-shot compression can be compared at the very same final ranks.

Without a MAC target the guide is the new rank. With one, each layer moves along a path from its
current rank (t = 0) to its guide (t = 1) and on, proportionally, towards rank 1 (t = 2); one
global t meets the stage's MAC goal, then the slack left by rank granularity is filled greedily.
"""
from __future__ import annotations

import math
from math import prod
from typing import Any, Mapping, Sequence

from torch import nn

from ..planning import PlannedLayer, fraction_rank, layer_cost, rank_space
from ..plan import LayerSpec

GRID = 201  # points of t in [0, 2]


def groups_of(layer: PlannedLayer) -> int:
    return int(getattr(layer.module, "groups", 1))


def valid(layer: PlannedLayer, rank: Any) -> Any:
    """``rank`` rounded down to a multiple of the groups (at least one per group)."""
    g = groups_of(layer)
    fix = lambda r: max(g, (int(r) // g) * g)  # noqa: E731
    return tuple(fix(r) for r in rank) if isinstance(rank, tuple) else fix(rank)


def full_rank(layer: PlannedLayer) -> Any:
    """The rank a dense layer stands at: Tucker (S, T), SVD min(T, S/g prod(k)) (Linear
    min(M, N)), CP the rank whose parameters match the dense layer's."""
    mod = layer.module
    if layer.method == "tucker":
        return (mod.in_channels, mod.out_channels)
    if layer.method == "cp":
        return rank_space(layer)[-1]
    if isinstance(mod, nn.Linear):
        return min(mod.in_features, mod.out_features)
    return min(mod.out_channels, mod.in_channels // mod.groups * prod(mod.kernel_size))


def current_rank(layer: PlannedLayer, spec: LayerSpec) -> Any:
    return spec.rank if spec.compressed else full_rank(layer)


def cp_equivalent(shape: Sequence[int], tucker_rank: tuple[int, int]) -> int:
    """CP rank with the parameters of a Tucker-2 at (r_in, r_out) of a (T, S, *k) kernel."""
    t, s, k = shape[0], shape[1], shape[2:]
    r_in, r_out = tucker_rank
    params = s * r_in + r_in * r_out * prod(k) + r_out * t
    return max(1, round(params / (s + t + sum(k))))


def guide_rank(layer: PlannedLayer, spec: LayerSpec, module: nn.Module, stage_ranks: Any,
               factor: float, stage: int) -> tuple[Any, str]:
    """(guide rank or None, why): None when ``stage_ranks`` does not apply to this layer."""
    if isinstance(stage_ranks, Mapping):  # final ranks given (e.g. a one-shot plan's): head for them
        if layer.name not in stage_ranks:
            return None, "not in the final ranks"
        return valid(layer, stage_ranks[layer.name]), "final rank given"
    if isinstance(stage_ranks, str):
        if groups_of(layer) != 1:
            return None, f"EVBMF rule needs groups=1 (groups={groups_of(layer)})"
        return _vbmf(layer, spec, module, factor), f"EVBMF (factor {factor:g})"
    frac = float(stage_ranks[min(stage, len(stage_ranks)) - 1])
    if not spec.compressed:
        return valid(layer, fraction_rank(layer, frac)), f"{frac:g} of the rank"
    cur = spec.rank
    scale = lambda r: max(1, round(frac * r))  # noqa: E731
    new = tuple(scale(r) for r in cur) if isinstance(cur, tuple) else scale(cur)
    return valid(layer, new), f"{frac:g} of the current rank"


def _vbmf(layer: PlannedLayer, spec: LayerSpec, module: nn.Module, factor: float) -> Any:
    from ..planning import vbmf_ranks_factorized
    from ..rank.vbmf import soften_rank, vbmf_ranks

    if not spec.compressed:
        w = module.weight.detach()
        if layer.method == "cp":
            return cp_equivalent(tuple(w.shape), vbmf_ranks(w, "tucker", factor))
        return vbmf_ranks(w, layer.method, factor)
    if layer.method == "cp":
        import torch

        kernel = torch.cat([c.to_tensor() for c in module.to_cp()])
        pure = cp_equivalent(tuple(kernel.shape), vbmf_ranks(kernel, "tucker", 1.0))
        return soften_rank(spec.rank, min(pure, spec.rank), factor)
    return vbmf_ranks_factorized(module, factor)


def shrink(current: Any, new: Any) -> Any:
    """Elementwise min: a stage never raises a rank."""
    if isinstance(current, tuple):
        return tuple(min(a, b) for a, b in zip(current, new))
    return min(current, new)


def _along(cur: Any, guide: Any, t: float) -> Any:
    def one(r0: int, rg: int) -> float:
        rg = min(rg, r0)
        return r0 - t * (r0 - rg) if t <= 1 else rg * (2 - t) + (t - 1)
    if isinstance(cur, tuple):
        return tuple(max(1, round(one(a, b))) for a, b in zip(cur, guide))
    return max(1, round(one(cur, guide)))


def mac_path(layer: PlannedLayer, spec: LayerSpec, guide: Any) -> tuple[list[tuple[Any, int, int]], list[int]]:
    """Candidates ``(rank or None = dense, params, MACs)`` with strictly falling MACs (index 0
    = the layer now), and the candidate index at each of the ``GRID`` values of t."""
    if spec.compressed:
        cands = [(spec.rank, spec.params_after, spec.macs_after)]
    else:
        cands = [(None, layer.params, layer.macs)]
    cur = current_rank(layer, spec)
    guide = cur if guide is None else guide
    at: list[int] = []
    seen: dict[Any, tuple[int, int] | None] = {}
    for j in range(GRID):
        r = valid(layer, _along(cur, guide, 2.0 * j / (GRID - 1)))
        if r not in seen:
            try:
                seen[r] = layer_cost(layer, r)
            except ValueError:
                seen[r] = None
        cost = seen[r]
        if cost is not None and cost[1] < cands[-1][2]:
            cands.append((r, cost[0], cost[1]))
        at.append(len(cands) - 1)
    return cands, at


def fit_macs(paths: Mapping[str, tuple[list[tuple[Any, int, int]], list[int]]], fixed: int,
             goal: float) -> tuple[dict[str, int], int]:
    """Candidate index per layer so ``fixed + sum(MACs) <= goal`` as closely as the paths
    allow: the smallest common t that meets the goal, then the cheapest steps back towards
    each layer's current rank while the goal still holds. Returns (indices, total MACs);
    the total exceeds ``goal`` only when even the end of every path does."""
    def total(j: int) -> int:
        return fixed + sum(c[a[j]][2] for c, a in paths.values())

    lo, hi = 0, GRID - 1
    if total(hi) > goal:
        return {n: a[hi] for n, (c, a) in paths.items()}, total(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if total(mid) <= goal:
            hi = mid
        else:
            lo = mid + 1
    idx = {n: a[lo] for n, (c, a) in paths.items()}
    now = total(lo)
    while True:
        steps = [(paths[n][0][i - 1][2] - paths[n][0][i][2], n) for n, i in idx.items() if i > 0]
        steps = [(d, n) for d, n in steps if now + d <= goal]
        if not steps:
            return idx, now
        d, n = min(steps)
        idx[n] -= 1
        now += d


def stage_goal(current_ratio: float, target: float, stages_left: int) -> float:
    """Geometric MAC schedule: the ratio to reach this stage so that the same factor per stage
    reaches ``target`` after ``stages_left`` stages (this one included)."""
    if current_ratio <= target:
        return current_ratio
    return current_ratio * (target / current_ratio) ** (1.0 / max(1, stages_left))


def _final_ranks(rule: Mapping[Any, Any]) -> dict[str, Any]:
    """{layer name: int or tuple of ints >= 1} from a mapping of final ranks."""
    out: dict[str, Any] = {}
    for name, rank in rule.items():
        seq = tuple(rank) if isinstance(rank, (list, tuple)) else (rank,)
        if (not isinstance(name, str) or not seq
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in seq)):
            raise ValueError(f"musco: final ranks must map layer names to an int >= 1 or a list of "
                             f"them, got {name!r}: {rank!r}")
        out[name] = tuple(seq) if isinstance(rank, (list, tuple)) else rank
    if not out:
        raise ValueError("musco: the mapping of final ranks is empty")
    return dict(sorted(out.items()))


def check_stage_ranks(rule: Any, name: str = "stage_ranks") -> Any:
    """'vbmf', a fraction in (0, 1), a sequence of them (one per stage, the last repeats), or a
    mapping {layer name: final rank} (e.g. ``{s.name: s.rank for s in plan.compressed}``),
    normalised (a tuple of floats, a sorted dict); ``name`` is the argument named in errors."""
    if isinstance(rule, Mapping):
        return _final_ranks(rule)
    accepted = ("'vbmf', a fraction in (0, 1), a non-empty list of fractions in (0, 1) (one per "
                "stage) or a mapping {layer name: final rank}")
    if isinstance(rule, str):
        if rule != "vbmf":
            raise ValueError(f"musco: {name} must be {accepted}, got {rule!r} (make_plan's rank "
                             f"rule names do not apply to musco's stages)")
        return rule
    fracs = (rule,) if isinstance(rule, (int, float)) else rule
    try:
        fracs = tuple(fracs)
    except TypeError:
        fracs = None
    if not fracs or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                            and 0 < f < 1 and math.isfinite(f) for f in fracs):
        raise ValueError(f"musco: {name} must be {accepted}, got {rule!r}")
    return tuple(float(f) for f in fracs)

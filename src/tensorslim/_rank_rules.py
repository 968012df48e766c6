"""Rank rules of :func:`tensorslim.make_plan` (``rank_rule=...``): which rule a goal asks for,
its parameters, and the per-layer / whole-model rank choice for each rule.

=============== ================================ ==========================================
rank_rule       goal parameters                  rank of each layer
=============== ================================ ==========================================
manual          ranks=                           as given
uniform         target_macs= / target_params=    one global cost fraction (default)
min_error       target_macs= / target_params=,   whole-model target met while minimising the
                layer_weights={name: w}          weighted sum of per-layer error proxies
constant        rate=4.0                         largest rank with params <= dense / rate
vbmf            vbmf_factor=1.0                  EVBMF rank softened MUSCO-style
energy          energy=0.9                       fewest singular values keeping that energy
accuracy_drop   drop=0.005, evaluate=callable    smallest rank costing <= drop accuracy alone
=============== ================================ ==========================================
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

RULES = ("manual", "uniform", "min_error", "constant", "vbmf", "energy", "accuracy_drop")
# parameter -> (the rule it belongs to, default)
RULE_PARAMS: dict[str, tuple[str, Any]] = {
    "rate": ("constant", 4.0),
    "vbmf_factor": ("vbmf", 1.0),
    "drop": ("accuracy_drop", 0.005),
    "evaluate": ("accuracy_drop", None),
    "layer_weights": ("min_error", None),
}
RULE_OPTIONS = ("rank_rule",) + tuple(RULE_PARAMS)
_TARGETS = ("target_macs", "target_params")


def resolve_rule(goal: Mapping[str, Any], given: list[str], goals: tuple[str, ...]) -> tuple[str, str, Any]:
    """(rule, goal kind, goal value) for a ``make_plan`` goal; ``given`` are the goal keys set.

    Raises ValueError for an unknown rule, a missing / conflicting goal, a parameter of
    another rule, or an out-of-range parameter.
    """
    rule = goal.get("rank_rule")
    if rule is None:
        if len(given) != 1:
            raise ValueError(f"make_plan needs exactly one of {goals} (or a rank_rule among "
                             f"{RULES[3:]}), got {given or 'none'}")
        rule = {"ranks": "manual", "energy": "energy"}.get(given[0], "uniform")
    if rule not in RULES:
        raise ValueError(f"unknown rank_rule {rule!r}; known rank rules: {', '.join(RULES)}")
    for p, (owner, _) in RULE_PARAMS.items():
        if goal.get(p) is not None and owner != rule:
            raise ValueError(f"{p}= is a parameter of rank_rule={owner!r}, not of rank_rule={rule!r}")
    allowed = {"manual": ("ranks",), "uniform": _TARGETS, "min_error": _TARGETS,
               "energy": ("energy",)}.get(rule, ())
    if rule in ("manual", "uniform", "min_error") and len(given) != 1 or any(g not in allowed for g in given):
        raise ValueError(f"rank_rule={rule!r} needs {' or '.join(allowed) or 'no'} goal "
                         f"{'argument' if allowed else 'arguments'} (one of {allowed}), got {given or 'none'}")
    if given:
        return rule, given[0], goal[given[0]]
    if rule == "energy":
        return rule, "energy", 0.9
    _check_params(rule, goal)
    return rule, rule, None


def _check_params(rule: str, goal: Mapping[str, Any]) -> None:
    def number(name: str, ok: Callable[[float], bool], accepted: str) -> None:
        v = goal.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or not ok(v)):
            raise ValueError(f"{name} must be {accepted}, got {v!r}")

    number("rate", lambda v: v >= 1, "a number >= 1 (dense params / compressed params per layer)")
    number("vbmf_factor", lambda v: 0 <= v <= 1, "a number in [0, 1] (1 = pure EVBMF rank, 0 = no compression)")
    number("drop", lambda v: 0 <= v < 1, "an accuracy drop in [0, 1) (0.005 = half a point)")
    if rule == "accuracy_drop" and not callable(goal.get("evaluate")):
        raise TypeError(f"rank_rule='accuracy_drop' needs evaluate=callable(model) -> accuracy "
                        f"(e.g. on a validation subset), got {goal.get('evaluate')!r}")


def goal_record(rule: str, goal: Mapping[str, Any], kind: str, value: Any) -> dict[str, Any]:
    """The JSON-able goal of the plan: the rule, its parameters (defaults filled in), and a
    description in place of a callable ``evaluate``."""
    out: dict[str, Any] = {}
    for k, v in goal.items():
        if v is None:
            continue
        if callable(v):
            v = f"<callable {getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}>"
        elif isinstance(v, (list, tuple)):
            v = list(v)
        elif isinstance(v, Mapping):
            v = {str(a): (list(b) if isinstance(b, tuple) else b) for a, b in v.items()}
        out[k] = v
    out["rank_rule"] = rule
    if kind not in out and value is not None:
        out[kind] = value
    for p, (owner, default) in RULE_PARAMS.items():
        if owner == rule and p not in out and default is not None:
            out[p] = default
    return out


def choose(rule: str, layers: list, goal: Mapping[str, Any], *, model: nn.Module, obj: int,
           objective: str, total: int, kind: str, value: Any, method: str
           ) -> tuple[dict[str, Any], dict[str, str]]:
    """Ranks (or a reason to keep dense) per layer name, and notes for the chosen specs."""
    if rule == "energy":
        return {l.name: _energy_rank(l, value) for l in layers}, {}
    if rule == "constant":
        rate = goal.get("rate") or RULE_PARAMS["rate"][1]
        return _constant(layers, float(rate))
    if rule == "vbmf":
        factor = goal.get("vbmf_factor")
        factor = RULE_PARAMS["vbmf_factor"][1] if factor is None else float(factor)
        return _vbmf(layers, factor)
    if rule == "min_error":
        return _min_error(layers, goal.get("layer_weights"), obj, total, kind, value)
    if rule == "accuracy_drop":
        drop = goal.get("drop")
        drop = RULE_PARAMS["drop"][1] if drop is None else float(drop)
        return _accuracy_drop(model, layers, obj, objective, drop, goal["evaluate"])
    raise ValueError(f"rank_rule {rule!r} has no per-layer chooser; known: {', '.join(RULES)}")


def _constant(layers: list, rate: float) -> tuple[dict[str, Any], dict[str, str]]:
    from ._planner import rank_candidates
    from .rank.rules import constant_rate_index

    chosen, notes = {}, {}
    for l in layers:
        cands = rank_candidates(l, 0)
        i = constant_rate_index([c[1][0] for c in cands], l.params, rate)
        if i is None:
            chosen[l.name] = (f"kept dense: no {l.method} rank has params <= {l.params:,d}/{rate:g}")
            continue
        chosen[l.name] = cands[i][0]
        notes[l.name] = f"constant rate: params {cands[i][1][0]:,d} <= {l.params:,d}/{rate:g}"
    return chosen, notes


def _vbmf_rank(layer: Any, factor: float) -> Any:
    """EVBMF rank of one layer; a grouped conv takes the largest per-group rank times groups."""
    from .rank.vbmf import vbmf_ranks

    if layer.method not in ("tucker", "svd"):
        raise ValueError(
            f"layer {layer.name}: rank_rule='vbmf' works for methods 'tucker' and 'svd' (EVBMF "
            f"estimates matrix ranks of the kernel's unfoldings), got {layer.method!r}; use "
            f"method 'tucker'/'svd'/'auto', or another rank_rule for 'cp'/'tt'")
    w = layer.module.weight.detach()
    g = getattr(layer.module, "groups", 1)
    ranks = [vbmf_ranks(wg, layer.method, factor) for wg in w.chunk(g, dim=0)]
    if layer.method == "svd":
        return max(ranks) * g
    return (max(r[0] for r in ranks) * g, max(r[1] for r in ranks) * g)


def _vbmf(layers: list, factor: float) -> tuple[dict[str, Any], dict[str, str]]:
    chosen = {l.name: _vbmf_rank(l, factor) for l in layers}
    return chosen, {n: f"EVBMF rank, vbmf_factor={factor:g}" for n in chosen}


def _min_error(layers: list, weights: Any, obj: int, total: int, kind: str, target: float
               ) -> tuple[dict[str, Any], dict[str, str]]:
    from ._planner import rank_candidates
    from .rank.rules import error_proxies, min_error_allocation

    weights = _layer_weights(weights, layers)
    cands = {l.name: rank_candidates(l, obj) for l in layers}
    dense = {l.name: (l.params, l.macs)[obj] for l in layers}
    costs, errors = [], []
    for l in layers:
        c = cands[l.name]
        errs = error_proxies(l.module.weight, l.method, [r for r, _ in c],
                             getattr(l.module, "groups", 1), **l.options) if c else []
        costs.append([rc[1][obj] for rc in c] + [dense[l.name]])
        errors.append(errs + [0.0])
    fixed = total - sum(dense.values())
    budget = target * total - fixed
    cheapest = fixed + sum(min(c) for c in costs)
    if cheapest > target * total * 1.0000001:
        raise ValueError(f"{kind}={target} is unreachable: with the smallest rank on every compressible "
                         f"layer the model keeps {cheapest / total:.4f} of its cost (best reachable "
                         f"{kind}={cheapest / total:.4f})")
    idx = min_error_allocation(costs, errors, budget, [weights[l.name] for l in layers])
    chosen, notes = {}, {}
    for l, i, errs in zip(layers, idx, errors):
        if i == len(cands[l.name]):
            chosen[l.name] = ("kept dense: the min-error allocation keeps it dense" if cands[l.name]
                              else "no rank of this method reduces its cost")
            continue
        chosen[l.name] = cands[l.name][i][0]
        notes[l.name] = f"min_error: error proxy {errs[i]:.4g} (weight {weights[l.name]:g})"
    return chosen, notes


def _layer_weights(weights: Any, layers: list) -> dict[str, float]:
    names = [l.name for l in layers]
    if weights is None:
        return {n: 1.0 for n in names}
    if not isinstance(weights, Mapping):
        raise TypeError(f"layer_weights must be a mapping {{layer name: weight}}, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        import difflib

        close = {u: difflib.get_close_matches(str(u), names, n=3) for u in unknown}
        hint = "; ".join(f"{u!r} -> {c}" for u, c in close.items() if c)
        raise ValueError(f"layer_weights names layers that are not planned for compression: {unknown}"
                         f"{'; close matches: ' + hint if hint else ''}; planned: {names}")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"layer_weights[{n!r}] must be a finite number >= 0, got {w!r}")
    return {n: float(weights.get(n, 1.0)) for n in names}


def _accuracy_drop(model: nn.Module, layers: list, obj: int, objective: str, drop: float,
                   evaluate: Callable[[nn.Module], float]) -> tuple[dict[str, Any], dict[str, str]]:
    """Per layer, alone on a copy of ``model``: the cheapest rank candidate whose accuracy
    drop (``evaluate(dense) - evaluate(compressed)``, before any fine-tuning) is <= ``drop``,
    by bisection over the candidates sorted by cost (the drop is assumed monotone in rank)."""
    from tqdm.auto import tqdm

    from ._planner import _spec, rank_candidates
    from .plan import CompressionPlan
    from .rank.rules import smallest_passing
    from .surgery import compress

    base = float(evaluate(model))
    chosen, notes = {}, {}
    bar = tqdm(layers, desc="accuracy-drop ranks", disable=not layers)
    for l in bar:
        cands = rank_candidates(l, obj)
        cache: dict[int, float] = {}

        def cost_of(i: int) -> float:
            if i not in cache:
                spec = _spec(l, cands[i][0], obj, objective)
                trial = compress(copy.deepcopy(model), CompressionPlan((spec,), l.method), progress=False)
                cache[i] = base - float(evaluate(trial))
                bar.set_postfix(layer=l.name, rank=str(cands[i][0]), drop=f"{cache[i]:.4f}")
            return cache[i]

        i = smallest_passing(len(cands), lambda k: cost_of(k) <= drop)
        if i is None:
            chosen[l.name] = ("kept dense: no rank of this method reduces its cost" if not cands else
                              f"kept dense: even rank {cands[-1][0]} alone drops accuracy by "
                              f"{cache[len(cands) - 1]:.4f} > {drop:g}")
            continue
        chosen[l.name] = cands[i][0]
        notes[l.name] = (f"accuracy drop {cache[i]:.4f} <= {drop:g} when compressed alone "
                         f"(dense {base:.4f}, {len(cache)} evaluations)")
    return chosen, notes


def manual_ranks(layers: list, ranks: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Ranks from ``ranks=`` (manual rule) and notes for the layers whose rank was rounded."""
    chosen, notes = {}, {}
    for l in layers:
        chosen[l.name], note = _manual_rank(l, ranks)
        if note:
            notes[l.name] = note
    return chosen, notes


def _manual_rank(layer: Any, ranks: Any) -> tuple[Any, str]:
    """(rank or reason to keep dense, note). A fraction, or one rank for every layer, becomes
    the nearest valid rank of each layer (``valid_rank``: multiples of groups, within bounds);
    a rank given for this layer by name must be valid as it is."""
    named = isinstance(ranks, Mapping)
    if named and layer.name not in ranks:
        return "no rank given for this layer", ""
    r = ranks[layer.name] if named else ranks
    if isinstance(r, float) and not isinstance(r, bool):
        if not 0 < r <= 1:
            raise ValueError(f"layer {layer.name}: a fractional rank must be in (0, 1], got {r}")
        return _rounded(layer, _fraction_value(layer, r))
    if isinstance(r, list):
        r = tuple(r)
    if layer.method == "tucker" and isinstance(r, int):
        r = (r, r)
    if not named:
        return _rounded(layer, r)
    from ._planner import layer_cost

    try:
        layer_cost(layer, r)  # validates the rank against the layer
    except ValueError as e:
        raise ValueError(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    return r, ""


def _fraction_value(layer: Any, f: float) -> Any:
    """The real-valued rank ``f`` of the way up the layer's rank space (tucker: per mode)."""
    from ._planner import _rank_space

    mod = layer.module
    if layer.method == "tucker":
        return (f * mod.in_channels, f * mod.out_channels)
    return f * len(_rank_space(layer))


def _rounded(layer: Any, value: Any) -> tuple[Any, str]:
    """(the valid rank nearest to ``value``, a note when it is not ``value`` rounded)."""
    from ._planner import layer_cost

    try:
        r = layer.cls.valid_rank(layer.module, value, **layer.options)
        layer_cost(layer, r)
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    naive = tuple(max(1, round(v)) for v in value) if isinstance(value, tuple) else max(1, round(value))
    return r, "" if r == naive else f"rank {naive} is not valid for this layer; nearest valid rank {r}"


def _fraction_rank(layer: Any, f: float) -> Any:
    """The valid rank ``f`` (in (0, 1]) of the way up the layer's rank space."""
    return _rounded(layer, _fraction_value(layer, f))[0]


def _energy_rank(layer: Any, energy: float) -> Any:
    """The fewest singular values keeping ``energy``, raised to the next valid rank (groups)."""
    from .tensor import unfold

    w = layer.module.weight.detach().double()
    if layer.method == "svd":
        return _at_least(layer, _keep_energy(w.reshape(w.shape[0], -1), energy))
    if layer.method == "tucker":
        return _at_least(layer, (_keep_energy(unfold(w, 1), energy), _keep_energy(unfold(w, 0), energy)))
    if layer.method == "tt":
        from .tensor import tt_matrix

        eps = (1.0 - energy) ** 0.5
        tt = tt_matrix(w, layer.options["in_modes"], layer.options["out_modes"], eps=eps)
        return _at_least(layer, max(tt.ranks))
    raise ValueError(
        f"layer {layer.name}: the energy rule works for svd, tucker and tt; CP has no nested "
        f"optimal truncation, so use ranks= or target_macs=/target_params= with method 'cp'"
    )


def _at_least(layer: Any, r: Any) -> Any:
    """The smallest valid rank of ``layer`` that is >= ``r`` in every mode (or the largest
    valid rank, when ``r`` is above it)."""
    v = r
    for k in range(257):  # a valid rank lies within one multiple (of groups) above r
        v = layer.cls.valid_rank(layer.module, tuple(x + k for x in r) if isinstance(r, tuple) else r + k,
                                 **layer.options)
        if all(a >= b for a, b in zip(v, r)) if isinstance(r, tuple) else v >= r:
            return v
    return v


def _keep_energy(m: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(m) ** 2
    frac = torch.cumsum(s2, 0) / s2.sum()
    return int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype) - 1e-12).item()) + 1

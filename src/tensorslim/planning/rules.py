"""The rank rules of :func:`tensorslim.make_plan` (``rank_rule=...``), one frozen config each.

=============== ================================ ==========================================
rank_rule       make_plan keywords               rank of each layer
=============== ================================ ==========================================
manual          ranks=                           as given
uniform         target_macs= / target_params=    one global cost fraction
                / target_latency=
min_error       target_macs= / target_params=    whole-model target met while minimising the
                / target_latency=,               weighted sum of per-layer error proxies (default)
                layer_weights={name: w}
constant        rate=4.0                         largest rank with params <= dense / rate
vbmf            vbmf_factor=0.8                  EVBMF rank softened MUSCO-style
energy          energy=0.9                       fewest singular values keeping that energy
accuracy_drop   drop=0.005, evaluate=callable    smallest rank costing <= drop accuracy alone
=============== ================================ ==========================================

``RankRule.from_dict(rule.to_dict()) == rule`` for every rule (``evaluate`` is written as a
description; a rule read back that way needs a callable again before it can choose).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .candidates import PlannedLayer, rank_candidates
from ..configs import check_number
from .rule_base import RULES, Choice, PlanContext, RankRule, jsonable, register, rule_class
from .ranks import energy_rank, manual_rank
from .vbmf import layer_vbmf_rank
from ..rank.vbmf import DEFAULT_FACTOR

_TARGETS = ("target_macs", "target_params", "target_latency")


@register
@dataclass(frozen=True)
class Manual(RankRule):
    """``ranks=``: an int / tuple for every layer, a fraction in (0, 1], or {layer: rank}."""

    ranks: Any = None
    name = "manual"
    goals = ("ranks",)
    goal_needed = True

    def __post_init__(self) -> None:
        if self.ranks is None:
            raise ValueError("rank_rule='manual' needs ranks= (an int, a fraction or {layer name: rank})")

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        chosen, notes = {}, {}
        for l in layers:
            chosen[l.name], note = manual_rank(l, self.ranks)
            if note:
                notes[l.name] = note
        return chosen, notes


@dataclass(frozen=True)
class _Budget(RankRule):
    """A whole-model target: exactly one of ``target_macs`` / ``target_params`` /
    ``target_latency`` (measured time, see :mod:`.latency`) in (0, 1]."""

    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    goals = _TARGETS
    goal_needed = True

    def __post_init__(self) -> None:
        given = [k for k in _TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"rank_rule={self.name!r} needs exactly one of {' / '.join(_TARGETS)}, "
                             f"got {given or 'none'}")
        check_number(given[0], getattr(self, given[0]), lambda v: 0 < v <= 1, "a number in (0, 1]")

    @property
    def target(self) -> tuple[str, float]:
        kind = next(k for k in _TARGETS if getattr(self, k) is not None)
        return kind, float(getattr(self, kind))


@register
@dataclass(frozen=True)
class Uniform(_Budget):
    """Every layer keeps the same fraction of its cost (one global fraction, by bisection)."""

    name = "uniform"

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        from ..rank.budget import solve_budget

        kind, value = self.target
        cands = {l.name: ctx.candidates(l) for l in layers}
        dense = {l.name: ctx.dense_cost(l) for l in layers}
        chosen = solve_budget(dense, cands, ctx.total, ctx.feasible(value), kind=kind)
        if ctx.latency is not None:
            chosen.update({l.name: ctx.dense_reason(l) for l in layers if not cands[l.name]})
        return chosen, {}


@register
@dataclass(frozen=True)
class MinError(_Budget):
    """The target met while minimising the summed per-layer error proxy, each weighted by
    ``layer_weights[name]`` (default 1)."""

    layer_weights: Mapping[str, float] | None = None
    name = "min_error"

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        from .min_error import min_error_ranks

        kind, value = self.target
        return min_error_ranks(layers, self.layer_weights, ctx, kind, value)


@register
@dataclass(frozen=True)
class Constant(RankRule):
    """Per layer the largest rank with params <= dense params / ``rate``."""

    rate: float = 4.0
    name = "constant"

    def __post_init__(self) -> None:
        check_number("rate", self.rate, lambda v: v >= 1, "a number >= 1 (dense params / compressed params per layer)")

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        from ..rank.rules import constant_rate_index

        chosen, notes = {}, {}
        rate = float(self.rate)
        for l in layers:
            cands = rank_candidates(l, "params")
            i = constant_rate_index([c[1][0] for c in cands], l.params, rate)
            if i is None:
                chosen[l.name] = f"kept dense: no {l.method} rank has params <= {l.params:,d}/{rate:g}"
                continue
            chosen[l.name] = cands[i][0]
            notes[l.name] = f"constant rate: params {cands[i][1][0]:,d} <= {l.params:,d}/{rate:g}"
        return chosen, notes


@register
@dataclass(frozen=True)
class VBMF(RankRule):
    """EVBMF rank of each layer (tucker / svd), softened: R - vbmf_factor (R - R_evbmf)."""

    vbmf_factor: float = DEFAULT_FACTOR
    name = "vbmf"

    def __post_init__(self) -> None:
        check_number("vbmf_factor", self.vbmf_factor, lambda v: 0 <= v <= 1,
                     "a number in [0, 1] (1 = pure EVBMF rank, 0 = no compression)")

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        f = float(self.vbmf_factor)
        chosen = {l.name: layer_vbmf_rank(l, f) for l in layers}
        return chosen, {n: f"EVBMF rank, vbmf_factor={f:g}" for n in chosen}


@register
@dataclass(frozen=True)
class Energy(RankRule):
    """Per layer the fewest singular values keeping ``energy`` of the squared ones."""

    energy: float = 0.9
    name = "energy"
    goals = ("energy",)

    def __post_init__(self) -> None:
        check_number("energy", self.energy, lambda v: 0 < v <= 1, "a number in (0, 1]")

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        return {l.name: energy_rank(l, self.energy) for l in layers}, {}


@register
@dataclass(frozen=True)
class AccuracyDrop(RankRule):
    """Per layer, compressed alone: the cheapest rank whose accuracy drop
    ``evaluate(dense) - evaluate(compressed)`` is at most ``drop``."""

    drop: float = 0.005
    evaluate: Callable[[Any], float] | str | None = field(default=None, compare=False)
    name = "accuracy_drop"

    def __post_init__(self) -> None:
        check_number("drop", self.drop, lambda v: 0 <= v < 1, "an accuracy drop in [0, 1) (0.005 = half a point)")
        if not callable(self.evaluate) and not isinstance(self.evaluate, str):
            raise TypeError(f"rank_rule='accuracy_drop' needs evaluate=callable(model) -> accuracy "
                            f"(e.g. on a validation subset), got {self.evaluate!r}")

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        from .min_error import accuracy_drop_ranks

        if not callable(self.evaluate):
            raise TypeError(f"rank_rule='accuracy_drop' read from JSON records evaluate as "
                            f"{self.evaluate!r}; give it evaluate=callable(model) -> accuracy again")
        return accuracy_drop_ranks(ctx, layers, float(self.drop), self.evaluate)


RULE_PARAMS = tuple(dict.fromkeys(f for c in RULES.values() for f in c.__dataclass_fields__
                                  if f not in c.goals and f not in _TARGETS))
RULE_OPTIONS = ("rank_rule",) + RULE_PARAMS


def rule_from_goal(goal: Mapping[str, Any], goals: tuple[str, ...]) -> RankRule:
    """The rule a make_plan goal asks for (``rank_rule=`` or the one implied by its goal
    argument: ranks -> manual, energy -> energy, a target -> min_error, which beat uniform
    in every measured case: README, "Default rank rule"). ValueError for an
    unknown rule, a missing / conflicting goal, a parameter of another rule or an
    out-of-range value; TypeError for a missing ``evaluate``."""
    given = [g for g in goals if goal.get(g) is not None]
    name = goal.get("rank_rule")
    if name is None:
        if len(given) != 1:
            per_layer = tuple(n for n, c in RULES.items() if not c.goal_needed)
            raise ValueError(f"make_plan needs exactly one of {goals} (or a rank_rule among "
                             f"{per_layer}), got {given or 'none'}")
        name = {"ranks": "manual", "energy": "energy"}.get(given[0], "min_error")
    cls = rule_class(name)
    for p in RULE_PARAMS:
        if goal.get(p) is not None and p not in cls.__dataclass_fields__:
            owner = next(n for n, c in RULES.items() if p in c.__dataclass_fields__)
            raise ValueError(f"{p}= is a parameter of rank_rule={owner!r}, not of rank_rule={name!r}")
    if cls.goal_needed and len(given) != 1 or any(g not in cls.goals for g in given):
        allowed = cls.goals
        raise ValueError(f"rank_rule={name!r} needs {' or '.join(allowed) or 'no'} goal "
                         f"{'argument' if allowed else 'arguments'} (one of {allowed}), got {given or 'none'}")
    return cls(**{k: goal[k] for k in cls.__dataclass_fields__ if goal.get(k) is not None})


def goal_record(rule: RankRule, goal: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON goal of a plan: the make_plan arguments given, then the rule with its
    parameters (defaults filled in; a callable ``evaluate`` as its description)."""
    out = {k: jsonable(v) for k, v in goal.items() if v is not None}
    out.update(rule.to_dict())
    return out


__all__ = ["RULES", "RULE_OPTIONS", "RULE_PARAMS", "RankRule", "PlanContext", "Manual", "Uniform",
           "MinError", "Constant", "VBMF", "Energy", "AccuracyDrop", "rule_from_goal", "goal_record",
           "register"]

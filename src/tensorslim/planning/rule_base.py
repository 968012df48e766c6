"""The rank-rule registry: every rank rule of :func:`tensorslim.make_plan` is a frozen config
(:class:`RankRule`) registered under its ``rank_rule`` name, that round-trips through JSON and
chooses the rank of every planned layer with ``choose(layers, context)``."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

from ..plan import freeze
from .candidates import PlannedLayer, objective_index, rank_candidates

RULES: dict[str, type["RankRule"]] = {}  # rank_rule name -> config class, in registration order


@dataclass(frozen=True)
class PlanContext:
    """What a rule may read besides the layers: the dense model, the plan's method, the
    cost it reduces (``params``, ``macs`` or ``latency``) and the whole model's dense cost of
    that kind; for ``latency`` the measured table (:class:`.latency.LatencyTable`). Rules
    price a layer through :meth:`candidates` / :meth:`dense_cost`, so one rule serves every
    cost."""

    model: nn.Module
    method: str
    objective: str
    total: float
    latency: Any = None  # a LatencyTable for objective "latency"

    @property
    def obj(self) -> int:
        """0 for params, 1 for MACs (the index in a (params, MACs) cost pair); a latency plan
        prices MACs where a pair is needed."""
        return 1 if self.objective == "latency" else objective_index(self.objective)

    def candidates(self, layer: PlannedLayer) -> list[tuple[Any, float]]:
        """``(rank, cost)`` of ``layer``'s candidates cheaper than dense, ascending in cost
        (latency: the measured ranks faster than dense that no faster rank dominates)."""
        if self.latency is not None:
            return self.latency.candidates(layer.name)
        return [(r, c[self.obj]) for r, c in rank_candidates(layer, self.obj)]

    def dense_cost(self, layer: PlannedLayer) -> float:
        """``layer``'s dense cost (latency: measured ms, 0 when untimed: then it is part of
        the model's fixed rest)."""
        if self.latency is not None:
            return self.latency.dense_ms(layer.name)
        return layer.dense_cost(self.objective)

    def dense_reason(self, layer: PlannedLayer) -> str:
        """Why ``layer`` stays dense when it has no candidate."""
        if self.latency is not None:
            return self.latency.dense_reason(layer.name)
        return "kept dense: no rank of this method reduces its cost"

    def feasible(self, target: float) -> float:
        """``target``, or for a latency plan the best reachable ratio when ``target`` is
        below it (the plan then records the best reachable ratio and warns)."""
        if self.latency is None:
            return target
        return max(target, self.latency.best_ratio() * (1 + 1e-9))


Choice = tuple[dict[str, Any], dict[str, str]]  # (rank or reason to keep dense, note) per layer name


@dataclass(frozen=True)
class RankRule:
    """A rank rule. Subclasses set ``name`` (the ``rank_rule=`` value), ``goals`` (the
    make_plan goal arguments it takes: ranks / target_macs / target_params / energy) and
    ``goal_needed`` (exactly one of ``goals`` must be given); their fields are the rule's
    make_plan keywords, validated when the config is built."""

    name: ClassVar[str] = ""
    goals: ClassVar[tuple[str, ...]] = ()
    goal_needed: ClassVar[bool] = False

    def choose(self, layers: Sequence[PlannedLayer], ctx: PlanContext) -> Choice:
        """Per layer name: the chosen rank or a reason to keep it dense; and per layer name a
        one-line note for the spec's reason."""
        raise NotImplementedError

    @property
    def target(self) -> tuple[str, float] | None:
        """(``target_macs`` | ``target_params``, fraction) for whole-model budget rules."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """``{"rank_rule": name, keyword: value, ...}``: make_plan keywords, JSON values (a
        callable becomes its description)."""
        out: dict[str, Any] = {"rank_rule": self.name}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = jsonable(v)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "RankRule":
        """The rule a :meth:`to_dict` wrote. ValueError for an unknown rule or keyword."""
        if not isinstance(d, Mapping) or "rank_rule" not in d:
            raise ValueError(f"a rank rule must be a JSON object with 'rank_rule', got {d!r:.80}")
        cls = rule_class(d["rank_rule"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"rank_rule"})
        if unknown:
            raise ValueError(f"rank_rule={cls.name!r} has no parameters {unknown}; known: {sorted(known)}")
        return cls(**{k: freeze(v) for k, v in d.items() if k != "rank_rule"})

    @staticmethod
    def from_json(text: str) -> "RankRule":
        return RankRule.from_dict(json.loads(text))


def register(cls: type[RankRule]) -> type[RankRule]:
    """Class decorator: make ``cls`` the rule for ``rank_rule=cls.name``."""
    if not cls.name or cls.name in RULES:
        raise ValueError(f"a rank rule needs a new name, got {cls.name!r}; taken: {sorted(RULES)}")
    RULES[cls.name] = cls
    return cls


def rule_class(name: Any) -> type[RankRule]:
    if name not in RULES:
        raise ValueError(f"unknown rank_rule {name!r}; known rank rules: {', '.join(RULES)}")
    return RULES[name]


def jsonable(v: Any) -> Any:
    """``v`` as JSON data: tuples as lists (recursively), a callable as its description."""
    if callable(v):
        return f"<callable {getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}>"
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(a): jsonable(b) for a, b in v.items()}
    return v



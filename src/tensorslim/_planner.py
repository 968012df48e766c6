"""The planner behind :func:`tensorslim.make_plan`: trace shapes, enumerate rank candidates
per layer, and pick ranks from the goal (manual ranks, energy, or a whole-model budget)."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from math import prod
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._rank_rules import _fraction_rank  # noqa: F401  (used by methods._musco_ranks)
from .cost import CostReport, count
from .plan import KEEP, METHODS, CompressionPlan, LayerSpec, unknown_names_error

GOALS = ("ranks", "target_macs", "target_params", "energy")
OPTIONS = ("include", "exclude", "objective", "measure_error", "tt_order", "cp_epc")
_CONV = (nn.Conv1d, nn.Conv2d)


@dataclass
class _Layer:
    """A compressible layer being planned."""

    name: str
    module: nn.Module
    method: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int
    options: dict
    cls: type | None = None
    calls: int = 1


def auto_method(module: nn.Module) -> str:
    """``auto``: Tucker-2 for convs with a spatial kernel, SVD for Linear and 1x1 convs."""
    if isinstance(module, _CONV) and prod(module.kernel_size) > 1:
        return "tucker"
    return "svd"


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` balanced integer factors (largest first), e.g. 4096,3 -> 16,16,16."""
    from .layers.tt import factorize as _f

    return tuple(_f(n, d))


def _check_goal(method: str, goal: dict) -> tuple[str, str, Any]:
    """(rank rule, goal kind, goal value); see ``tensorslim._rank_rules``."""
    from ._rank_rules import RULE_OPTIONS, resolve_rule

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    unknown = set(goal) - set(GOALS) - set(OPTIONS) - set(RULE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown make_plan arguments {sorted(unknown)}; accepted: {GOALS + OPTIONS + RULE_OPTIONS}")
    given = [g for g in GOALS if goal.get(g) is not None]
    rule, kind, value = resolve_rule(goal, given, GOALS)
    if kind in ("target_macs", "target_params", "energy"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{kind} must be a number in (0, 1], got {value!r}")
    objective = goal.get("objective", "macs")
    if objective not in ("macs", "params"):
        raise ValueError(f"objective must be 'macs' or 'params', got {objective!r}")
    if goal.get("cp_epc") is not None and (not isinstance(goal["cp_epc"], bool) or goal["cp_epc"] and method != "cp"):
        raise ValueError(f"cp_epc must be True or False and needs method='cp' (CPD-EPC refines the CP "
                         f"layers), got cp_epc={goal['cp_epc']!r} with method={method!r}")
    return rule, kind, value


def _globs(p: str | Sequence[str] | None, what: str, names: list[str]) -> list[str] | None:
    """``include`` / ``exclude`` as a list of globs; ValueError for a glob matching no layer."""
    if p is None:
        return None
    pats = [p] if isinstance(p, str) else list(p) if isinstance(p, (list, tuple)) else None
    if pats is None or not all(isinstance(x, str) for x in pats):
        raise TypeError(f"{what} must be a glob string or a list of them, got {p!r}")
    empty = [g for g in pats if not any(fnmatch(n, g) for n in names)]
    if empty:
        raise unknown_names_error(f"{what}= (glob patterns on layer names)", empty, names)
    return pats


def _keep_reason(name: str, mod: nn.Module, macs: int, out_shape: tuple, sel: tuple, ties: dict) -> str:
    """Why a counted layer stays dense whatever the method ("" when it may be compressed)."""
    from .layers import FactorizedLayer

    include, exclude = sel
    if isinstance(mod, FactorizedLayer):
        return "already factorized"
    if include is not None and not any(fnmatch(name, g) for g in include) or \
            exclude is not None and any(fnmatch(name, g) for g in exclude):
        return "not selected by include/exclude"
    if name in ties:
        from .surgery import tie_reason

        return tie_reason(ties[name])
    if macs == 0 or not out_shape:
        return "not called by the example inputs"
    return ""


def _unsupported(method: str, mod: nn.Module, err: Exception) -> str:
    """The reason a layer no factorized layer of ``method`` can replace stays dense."""
    from .layers.registry import LAYERS

    if not any(isinstance(mod, t) for _, t in LAYERS):
        known = sorted({t.__name__ for _, t in LAYERS})
        return (f"kept dense: tensorslim has no factorized {type(mod).__name__} (for any method; "
                f"factorized layers replace {', '.join(known)}); it is counted, not compressed")
    return str(err)


def _collect(model: nn.Module, method: str, report: CostReport, goal: dict) -> tuple[list[_Layer], list[LayerSpec]]:
    """Split counted layers into compressible ones and specs of layers kept as they are.

    ValueError for an include/exclude glob that matches no layer, and for a layer to be
    compressed whose weights are not finite."""
    from .layers import layer_for
    from .surgery import weight_shape, weight_ties

    modules = dict(model.named_modules())
    names = [lc.name for lc in report.layers]
    sel = (_globs(goal.get("include"), "include", names), _globs(goal.get("exclude"), "exclude", names))
    ties = weight_ties(model, names)
    todo, kept = [], []
    for lc in report.layers:
        mod = modules[lc.name]
        keep = dict(name=lc.name, layer_type=lc.type, method=KEEP, rank=None, params_before=lc.params,
                    params_after=lc.params, macs_before=lc.macs, macs_after=lc.macs,
                    in_shape=lc.in_shape, out_shape=lc.out_shape, weight_shape=weight_shape(mod))
        reason = _keep_reason(lc.name, mod, lc.macs, lc.out_shape, sel, ties)
        if reason:
            kept.append(LayerSpec(**keep, reason=reason))
            continue
        m = auto_method(mod) if method == "auto" else method
        try:
            cls = layer_for(m, mod)
        except ValueError as e:
            kept.append(LayerSpec(**keep, reason=_unsupported(m, mod, e)))
            continue
        _check_finite(lc.name, mod)
        layer = _Layer(lc.name, mod, m, lc.in_shape, lc.out_shape, lc.params, lc.macs, {}, cls)
        if m == "tt":
            d = int(goal.get("tt_order", 3))
            layer.options = {"in_modes": factorize(mod.in_features, d), "out_modes": factorize(mod.out_features, d)}
        if m == "cp" and goal.get("cp_epc"):
            layer.options = {"epc": True}  # CPD-EPC in from_conv (see layers/cp.py)
        dense_macs = _dense_call_macs(mod, lc.out_shape)
        layer.calls = max(1, round(lc.macs / dense_macs)) if dense_macs else 1
        todo.append(layer)
    return todo, kept


def _check_finite(name: str, mod: nn.Module) -> None:
    """Non-finite weights make every decomposition (and rank rule) meaningless: an error
    naming the layer, raised while planning rather than when compressing."""
    for what in ("weight", "bias"):
        t = getattr(mod, what, None)
        if isinstance(t, torch.Tensor) and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t.detach())).sum())
            raise ValueError(f"layer {name} ({type(mod).__name__}): {what} has {bad} non-finite value(s) "
                             f"(NaN or Inf) out of {t.numel()}; tensorslim compresses finite weights only "
                             f"(fix the weights, or leave the layer out with exclude=[{name!r}])")


def _nothing_compressible(method: str, kept: list[LayerSpec], todo: list[_Layer], model: nn.Module,
                          objective: str) -> ValueError:
    """The error for a goal no layer can serve: why each layer stays dense."""
    why = [f"{s.name}: {s.reason}" for s in kept]
    why += [f"{l.name}: no {l.method} rank reduces its {objective}" for l in todo]
    if not why:
        from .cost import COUNTED

        other = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
                        if hasattr(m, "weight") and not isinstance(m, COUNTED)})
        why = ["it has no Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear layer that the example inputs reach"]
        if other:
            why.append(f"its layers with weights are of types tensorslim neither counts nor compresses: "
                       f"{', '.join(other)}" + (" (quantized modules: compress the float model, then quantize)"
                                                if any("quantized" in o for o in other) else ""))
    more = f"; ... ({len(why)} layers in all)" if len(why) > 8 else ""
    return ValueError(f"no layer of this model can be compressed with method {method!r}: "
                      f"{'; '.join(why[:8])}{more}")


def _dense_call_macs(mod: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(mod, nn.Linear):
        return prod(out_shape) * mod.in_features
    return prod(out_shape) * (mod.in_channels // mod.groups) * prod(mod.kernel_size)


def layer_cost(layer: _Layer, rank: Any) -> tuple[int, int]:
    """(params, MACs for the example inputs) of ``layer`` factorized at ``rank``."""
    batch = layer.in_shape[0] if layer.in_shape else 1
    p, m = layer.cls.cost(layer.module, rank, layer.in_shape[1:], layer.out_shape[1:], **layer.options)
    return int(p), int(m) * batch * layer.calls


def rank_candidates(layer: _Layer, objective: int) -> list[tuple[Any, tuple[int, int]]]:
    """Valid ranks of ``layer`` whose ``objective`` cost (0 params, 1 MACs) is below dense,
    sorted by that cost."""
    dense = (layer.params, layer.macs)
    out = []
    for r in _rank_space(layer):
        try:
            c = layer_cost(layer, r)
        except ValueError:
            continue
        if c[objective] < dense[objective]:
            out.append((r, c))
    out.sort(key=lambda rc: (rc[1][objective], rc[1][1 - objective]))
    return out


def _rank_space(layer: _Layer) -> list[Any]:
    mod, m = layer.module, layer.method
    if isinstance(mod, nn.Linear):
        out_f, in_f = mod.out_features, mod.in_features
    else:
        out_f, in_f = mod.out_channels, mod.in_channels
    if m == "svd":
        k = in_f if isinstance(mod, nn.Linear) else prod(mod.kernel_size) * mod.in_channels // mod.groups
        return list(range(1, min(out_f, k) + 1))
    if m == "tucker":
        n = max(in_f, out_f)
        pairs = {(max(1, round(i * in_f / n)), max(1, round(i * out_f / n))) for i in range(1, n + 1)}
        return sorted(pairs, key=lambda p: (p[0] * p[1], p))
    if m == "cp":
        per_rank = in_f + out_f + sum(mod.kernel_size)
        hi = layer.params // max(1, per_rank) + 2
        return list(range(1, hi + 1))
    if m == "tt":
        ins, outs = layer.options["in_modes"], layer.options["out_modes"]
        per_rank2 = sum(a * b for a, b in zip(ins, outs))
        hi = int((layer.params / max(1, per_rank2)) ** 0.5) + 2
        return list(range(1, hi + 1))
    raise ValueError(f"no rank space for method {m!r}")


def build_plan(model: nn.Module, method: str, example_inputs: Any, goal: dict) -> CompressionPlan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_plan expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("make_plan needs example_inputs (a tensor or tuple) to trace layer shapes")
    rule, kind, value = _check_goal(method, goal)
    objective = "params" if kind == "target_params" else "macs" if kind == "target_macs" else goal.get("objective", "macs")
    obj = 0 if objective == "params" else 1
    report = count(model, example_inputs)
    todo, kept = _collect(model, method, report, goal)
    if isinstance(value, Mapping) and rule == "manual":
        _check_rank_names(value, report, kept)
    if not todo or kind in ("target_macs", "target_params") and not any(rank_candidates(l, obj) for l in todo):
        raise _nothing_compressible(method, kept, todo, model, objective)
    total = report.total_params if obj == 0 else report.total_macs
    notes: dict[str, str] = {}
    if rule == "manual":
        from ._rank_rules import manual_ranks

        chosen, notes = manual_ranks(todo, value)
    elif rule == "uniform":
        from .rank.budget import solve_budget

        cands = {l.name: rank_candidates(l, obj) for l in todo}
        chosen = solve_budget(todo, cands, total, value, obj, kind)
    else:  # energy, min_error, constant, vbmf, accuracy_drop
        from ._rank_rules import choose

        chosen, notes = choose(rule, todo, goal, model=model, obj=obj, objective=objective,
                               total=total, kind=kind, value=value, method=method)
    specs = kept + [_noted(_spec(l, chosen[l.name], obj, objective), notes) for l in todo]
    order = {lc.name: i for i, lc in enumerate(report.layers)}
    specs.sort(key=lambda s: order[s.name])
    if goal.get("measure_error"):
        specs = [_with_error(model, s) for s in specs]
    from ._rank_rules import goal_record

    goal_json = goal_record(rule, goal, kind, value)
    plan = CompressionPlan(
        layers=(), method=method, goal={**goal_json, "objective": objective},
        params_before=report.total_params, params_after=report.total_params,
        macs_before=report.total_macs, macs_after=report.total_macs,
    )
    return plan.with_layers(tuple(specs))


def _check_rank_names(ranks: Mapping, report: CostReport, kept: list[LayerSpec]) -> None:
    """A ranks mapping may name only layers this plan compresses: ValueError (with close
    matches) for a name that is no layer, and for a layer that stays dense (with why)."""
    names = [lc.name for lc in report.layers]
    unknown = [n for n in ranks if n not in names]
    if unknown:
        raise unknown_names_error("ranks", [str(n) for n in unknown], names)
    dense = [f"{s.name}: {s.reason}" for s in kept if s.name in ranks]
    if dense:
        raise ValueError(f"ranks gives a rank to layers that stay dense: {'; '.join(dense)}")


def _spec(layer: _Layer, rank: Any, obj: int, objective: str) -> LayerSpec:
    from .surgery import weight_shape

    base = dict(name=layer.name, layer_type=type(layer.module).__name__, params_before=layer.params,
                macs_before=layer.macs, in_shape=layer.in_shape, out_shape=layer.out_shape,
                weight_shape=weight_shape(layer.module))
    if isinstance(rank, str):  # a reason to keep the layer dense
        return LayerSpec(**base, method=KEEP, rank=None, params_after=layer.params, macs_after=layer.macs, reason=rank)
    try:
        p, m = layer_cost(layer, rank)
    except ValueError as e:
        raise ValueError(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    if (p, m)[obj] >= (layer.params, layer.macs)[obj]:
        return LayerSpec(**base, method=KEEP, rank=None, params_after=layer.params, macs_after=layer.macs,
                         reason=f"{layer.method} at rank {rank} would not reduce {objective} "
                                f"({(p, m)[obj]:,d} >= {(layer.params, layer.macs)[obj]:,d}); kept dense")
    return LayerSpec(**base, method=layer.method, rank=rank, params_after=p, macs_after=m,
                     options=dict(layer.options), reason="")


def _noted(spec: LayerSpec, notes: dict[str, str]) -> LayerSpec:
    """``spec`` with the rank rule's note as its reason (compressed specs only)."""
    if not spec.compressed or spec.name not in notes:
        return spec
    from dataclasses import replace

    return replace(spec, reason=notes[spec.name])


def _with_error(model: nn.Module, spec: LayerSpec) -> LayerSpec:
    if not spec.compressed:
        return spec
    from dataclasses import replace

    from .surgery import build_layer

    layer = build_layer(model.get_submodule(spec.name), spec, decompose=True)
    return replace(spec, error=layer.approx_error)


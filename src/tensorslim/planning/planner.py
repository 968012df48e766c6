""":func:`make_plan`: trace shapes, collect the compressible layers, let the rank rule choose
their ranks, and write the plan."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from torch import nn

from ..cost import CostReport, count
from ..plan import METHODS, CompressionPlan, LayerSpec, unknown_names_error
from .candidates import PlannedLayer, build_spec, collect_layers, rank_candidates
from .rule_base import PlanContext, RankRule
from .rules import RULE_OPTIONS, goal_record, rule_from_goal

GOALS = ("ranks", "target_macs", "target_params", "energy")
OPTIONS = ("include", "exclude", "objective", "measure_error", "tt_order", "cp_epc")


def make_plan(model: nn.Module, method: str = "tucker", example_inputs: Any = None, **goal: Any) -> CompressionPlan:
    """Choose a method and rank for every compressible layer of ``model``.

    Args:
        model: the dense ``nn.Module``.
        method: ``cp`` | ``tucker`` | ``svd`` | ``tt`` | ``auto`` (tucker for k>1 convs, svd for
            Linear and 1x1 convs).
        example_inputs: a tensor or tuple of inputs used to trace shapes (MACs depend on them).
        ranks: an int for every layer, a float in (0, 1] (fraction of each mode's full rank),
            or a mapping from layer name to rank (ints or fractions). A fraction, or one int
            for every layer, becomes each layer's nearest valid rank (e.g. a multiple of a
            grouped conv's groups; the spec's reason says when it was moved); a rank given
            by name must be valid as it is.
        target_macs / target_params: keep this fraction of the whole model's MACs / params
            (``target_macs=0.25`` = 4x fewer), met to within 2% when reachable.
        energy: fraction of squared singular values kept per layer (svd, tucker, tt).
        include / exclude: glob patterns on qualified layer names.
        objective: ``macs`` (default) or ``params``: the cost a layer must reduce to be
            compressed; a layer that would not get cheaper is kept dense with the reason.
        measure_error: decompose every chosen layer now and record the approximation error.
        cp_epc: with ``method="cp"``, decompose by CPD-EPC (``options={"epc": True}`` on every
            CP layer spec: the CP-ALS error at least sensitivity, Phan et al. 2020).
        rank_rule: how ranks are chosen (recorded in ``plan.goal`` with its parameters; see
            ``tensorslim.planning.rules``): ``"min_error"`` (default for target_macs/target_params:
            the target met while minimising the summed per-layer error proxy, weighted by
            ``layer_weights={name: w}``), ``"uniform"`` (one cost fraction for every layer), ``"constant"`` (``rate=4.0``: per layer the largest
            rank with params <= dense/rate), ``"vbmf"`` (``vbmf_factor=1.0``: EVBMF ranks,
            MUSCO-softened; tucker/svd), ``"energy"`` (``energy=0.9``), ``"accuracy_drop"``
            (``drop=0.005``, ``evaluate=callable(model) -> accuracy``: per layer the cheapest
            rank whose compression alone costs at most ``drop``; the callable is recorded as a
            description).

    Every counted layer is listed (transposed convs and layers holding a weight shared with
    another module, e.g. an LM head tied to its embedding, stay dense with the reason).
    ValueError, naming the layer or the argument: a name in ``ranks`` / ``layer_weights``
    that is no (compressible) layer, or an include/exclude glob matching no layer (with
    close matches); no layer this method can compress (with each layer's reason); a layer
    to compress with NaN/Inf weights (leave it out with ``exclude``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_plan expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("make_plan needs example_inputs (a tensor or tuple) to trace layer shapes")
    rule = _check_goal(method, goal)
    objective = (rule.target[0].removeprefix("target_") if rule.target is not None
                 else goal.get("objective", "macs"))
    report = count(model, example_inputs)
    todo, kept = collect_layers(model, method, report, goal)
    if rule.name == "manual" and isinstance(goal["ranks"], Mapping):
        _check_rank_names(goal["ranks"], report, kept)
    if not todo or rule.target is not None and not any(rank_candidates(l, objective) for l in todo):
        raise _nothing_compressible(method, kept, todo, model, objective)
    ctx = PlanContext(model, method, objective, report.total_params if objective == "params" else report.total_macs)
    chosen, notes = rule.choose(todo, ctx)
    specs = kept + [_noted(build_spec(l, chosen[l.name], objective), notes.get(l.name, ""), l.note) for l in todo]
    order = {lc.name: i for i, lc in enumerate(report.layers)}
    specs.sort(key=lambda s: order[s.name])
    if goal.get("measure_error"):
        specs = [_with_error(model, s) for s in specs]
    plan = CompressionPlan(
        layers=(), method=method, goal={**goal_record(rule, goal), "objective": objective},
        params_before=report.total_params, params_after=report.total_params,
        macs_before=report.total_macs, macs_after=report.total_macs,
    )
    return plan.with_layers(tuple(specs))


def _check_goal(method: str, goal: dict) -> RankRule:
    """The rank rule of a make_plan goal; ValueError for an unknown method or argument, or
    an invalid option."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    unknown = set(goal) - set(GOALS) - set(OPTIONS) - set(RULE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown make_plan arguments {sorted(unknown)}; accepted: {GOALS + OPTIONS + RULE_OPTIONS}")
    rule = rule_from_goal(goal, GOALS)
    objective = goal.get("objective", "macs")
    if objective not in ("macs", "params"):
        raise ValueError(f"objective must be 'macs' or 'params', got {objective!r}")
    if goal.get("cp_epc") is not None and (not isinstance(goal["cp_epc"], bool) or goal["cp_epc"] and method != "cp"):
        raise ValueError(f"cp_epc must be True or False and needs method='cp' (CPD-EPC refines the CP "
                         f"layers), got cp_epc={goal['cp_epc']!r} with method={method!r}")
    return rule


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


def _nothing_compressible(method: str, kept: list[LayerSpec], todo: list[PlannedLayer], model: nn.Module,
                          objective: str) -> ValueError:
    """The error for a goal no layer can serve: why each layer stays dense."""
    why = [f"{s.name}: {s.reason}" for s in kept]
    why += [f"{l.name}: no {l.method} rank reduces its {objective}" for l in todo]
    if not why:
        from ..cost import COUNTED

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


def _noted(spec: LayerSpec, *notes: str) -> LayerSpec:
    """``spec`` with the non-empty notes (the rule's, the layer's) as its reason, when compressed."""
    text = "; ".join(n for n in notes if n)
    return replace(spec, reason=text) if spec.compressed and text else spec


def _with_error(model: nn.Module, spec: LayerSpec) -> LayerSpec:
    if not spec.compressed:
        return spec
    from ..surgery import build_layer

    layer = build_layer(model.get_submodule(spec.name), spec, decompose=True)
    return replace(spec, error=layer.approx_error)

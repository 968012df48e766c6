""":func:`make_plan`: trace shapes, collect the compressible layers, let the rank rule choose
their ranks, and write the plan."""
from __future__ import annotations

from dataclasses import replace
import warnings
from typing import Any, Mapping

from torch import nn

from ..cost import CostReport, count
from ..plan import METHODS, CompressionPlan, LayerSpec, unknown_names_error
from .candidates import PlannedLayer, build_spec, collect_layers, rank_candidates
from .latency import LATENCY_OPTIONS, LatencySettings, latency_record, latency_settings, verified_choice
from .latency_measure import measure_table
from .min_error import data_context
from .rule_base import PlanContext, RankRule
from .rules import RULE_OPTIONS, goal_record, rule_from_goal

GOALS = ("ranks", "target_macs", "target_params", "target_latency", "energy")
OPTIONS = ("include", "exclude", "objective", "measure_error", "tt_order", "cp_epc", "calibration") + LATENCY_OPTIONS


def make_plan(model: nn.Module, method: str = "tucker", example_inputs: Any = None, **goal: Any) -> CompressionPlan:
    """Choose a method and rank for every compressible layer of ``model``.

    Args:
        model: the dense ``nn.Module``.
        method: ``cp`` | ``tucker`` | ``svd`` | ``tt`` | ``auto`` (tucker for k>1 convs, svd for
            Linear and 1x1 convs).
        example_inputs: a tensor or tuple of inputs used to trace shapes (MACs depend on them);
            for a Hugging Face encoder e.g. ``(input_ids, attention_mask)``.
        ranks: an int for every layer, a float in (0, 1] (fraction of each mode's full rank),
            or a mapping from layer name to rank (ints or fractions); a fraction, or one int
            for every layer, becomes each layer's nearest valid rank (the reason says when it
            moved); a rank given by name must be valid as it is.
        target_macs / target_params: keep this fraction of the whole model's MACs / params
            (``target_macs=0.25`` = 4x fewer), met to within 2% when reachable.
        target_latency: keep this fraction of the dense model's MEASURED time: candidate ranks
            of every layer are timed on this machine (``latency_batch``: default the example
            inputs' batch; ``layout``: ``"channels_last"`` (default) or ``"nchw"``;
            ``latency_timer``, ``latency_cache``: see :mod:`tensorslim.planning.latency`). A
            layer no rank makes faster stays dense; the choice is checked on the whole model;
            ``plan.goal["latency"]`` records measured and predicted times. An unreachable
            target warns and plans the fastest choice (never one slower than dense).
        energy: fraction of squared singular values kept per layer (svd, tucker, tt).
        include / exclude: glob patterns on qualified layer names.
        objective: ``macs`` (default) or ``params``: the cost a layer must reduce.
        measure_error: decompose every chosen layer now and record the approximation error.
        cp_epc: with ``method="cp"``, decompose every CP layer by CPD-EPC.
        calibration: model inputs (an iterable of batches: tensors, tuples of positional
            tensors or tokenizer dicts) or a :class:`tensorslim.calibration.Calibration`: the
            ``min_error`` rule then prices every SVD Linear's ranks by the error of its
            data-aware factorisation on the inputs it sees (by default how much the model's
            outputs change when only that layer is truncated: ``tensorslim.calibration.ERRORS``;
            sensitive layers keep more rank), and ``plan.goal["calibration"]`` records the
            variant, the error and the number of batches. Pass the
            same to :func:`tensorslim.compress` to decompose data-aware.
        rank_rule: how ranks are chosen (recorded in ``plan.goal``; see
            :mod:`tensorslim.planning.rules`): ``min_error`` (default for a target),
            ``uniform``, ``constant``, ``vbmf``, ``energy``, ``accuracy_drop``.

    Every counted layer is listed (one that stays dense with its reason). ValueError naming
    the layer or argument: a name in ``ranks`` / ``layer_weights`` that is no (compressible)
    layer, or a glob matching none (with close matches); no layer this method can compress;
    NaN/Inf weights in a layer to compress; an argument out of range.
    """
    calibration = goal.pop("calibration", None)
    rule = _check_goal(model, method, example_inputs, goal)
    latency = latency_settings(goal)
    objective = (rule.target[0].removeprefix("target_") if rule.target is not None
                 else goal.get("objective", "macs"))
    priced = "macs" if objective == "latency" else objective  # what a spec's cost check uses
    report = count(model, example_inputs)
    todo, kept = collect_layers(model, method, report, goal)
    if rule.name == "manual" and isinstance(goal["ranks"], Mapping):
        _check_rank_names(goal["ranks"], report, kept)
    if not todo or rule.target is not None and not any(rank_candidates(l, priced) for l in todo):
        raise _nothing_compressible(method, kept, todo, model, priced)
    ctx = _context(model, method, objective, report, todo, example_inputs, latency)
    if calibration is not None:
        ctx, goal["calibration"] = data_context(ctx, todo, calibration)
    chosen, notes, ctx = _choose(rule, todo, ctx)
    specs = kept + [_noted(build_spec(l, chosen[l.name], priced), notes.get(l.name, ""), l.note) for l in todo]
    order = {lc.name: i for i, lc in enumerate(report.layers)}
    specs.sort(key=lambda s: order[s.name])
    if goal.get("measure_error"):
        specs = [_with_error(model, s) for s in specs]
    plan = CompressionPlan(layers=(), method=method, goal=_record(rule, goal, ctx, chosen),
                           params_before=report.total_params,
                           params_after=report.total_params, macs_before=report.total_macs,
                           macs_after=report.total_macs)
    return plan.with_layers(tuple(specs))


def _context(model: nn.Module, method: str, objective: str, report: CostReport, todo: list[PlannedLayer],
             example_inputs: Any, latency: LatencySettings | None) -> PlanContext:
    """The rules' view of the plan; for a latency goal, with the measured table."""
    if objective == "latency" and latency is not None:
        table = measure_table(model, todo, example_inputs, report.batch_size, latency)
        return PlanContext(model, method, objective, table.total_ms, table)
    return PlanContext(model, method, objective, report.total_params if objective == "params" else report.total_macs)


def _choose(rule: RankRule, layers: list[PlannedLayer], ctx: PlanContext) -> tuple[dict, dict, PlanContext]:
    """The rule's choice; for a latency goal checked on the whole model (and corrected)."""
    chosen, notes = rule.choose(layers, ctx)
    return verified_choice(rule, layers, ctx, chosen, notes)


def _record(rule: RankRule, goal: Mapping[str, Any], ctx: PlanContext, chosen: Mapping[str, Any]) -> dict:
    """The plan's goal: the arguments, the rule, the objective and, for a latency goal, the
    measured table's record (warning when the target was unreachable)."""
    record = {**goal_record(rule, goal), "objective": ctx.objective}
    if ctx.latency is not None:
        record["latency"] = latency_record(ctx.latency, chosen, rule.target[1])
        if "note" in record["latency"]:
            warnings.warn(record["latency"]["note"], RuntimeWarning, stacklevel=3)
    return record


def _check_goal(model: nn.Module, method: str, example_inputs: Any, goal: dict) -> RankRule:
    """The rank rule of a make_plan goal; TypeError for a model that is no module,
    ValueError for missing inputs, an unknown method or argument, or an invalid option."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_plan expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("make_plan needs example_inputs (a tensor or tuple) to trace layer shapes")
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

"""The searching rank rules: ``min_error`` (a whole-model target met at the least weighted
error proxy) and ``accuracy_drop`` (per layer, the cheapest rank within an accuracy drop).
With calibration, ``min_error`` prices layers by the data-aware error curves of
``tensorslim.calibration`` (model sensitivities: ``tensorslim.sensitivity``)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields as dc_fields, replace
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .candidates import PlannedLayer, build_spec, rank_candidates
from .rule_base import Choice, PlanContext


@dataclass(frozen=True)
class DataPlanContext(PlanContext):
    """A :class:`PlanContext` with calibration data: ``output_errors`` maps a layer name to its
    data-aware error at every rank 0..full (data-aware SVD of a Linear; what kind:
    ``error_kind``, see ``tensorslim.calibration.ERRORS``), which ``min_error`` uses instead of
    the weight-error proxy."""

    output_errors: Mapping[str, Any] = field(default_factory=dict)
    error_kind: str = "relative"


def data_context(ctx: PlanContext, layers: Sequence[PlannedLayer], calibration: Any) -> tuple[PlanContext, dict]:
    """``ctx`` with the output-error curves of the SVD Linear layers among ``layers`` from
    ``calibration`` (batches of model inputs or a ready ``Calibration``), and the plan's record
    of it (``{"variant", "error", "batches", "layers"}``, plus ``"note"`` when the error was
    changed). An absolute output error and a relative weight error are not comparable, so:
    with other planned layers than SVD Linears and embeddings (convs) the relative output
    error is used; an SVD Linear the data does not reach is an error; embedding tables are
    priced by their measured lookups when the calibration has them, else kept dense
    (:data:`UNPRICED`)."""
    from ..calibration import as_calibration

    names = [l.name for l in layers if l.method == "svd" and isinstance(l.module, nn.Linear)]
    tables = [l.name for l in layers if isinstance(l.module, nn.Embedding)]
    if not names:
        return ctx, {"layers": 0}
    cal = as_calibration(ctx.model, calibration, layers=names + tables)
    others = [l.name for l in layers if l.name not in names and not isinstance(l.module, nn.Embedding)]
    note = None
    if others and cal.error != "relative":
        # those layers (convs, non-SVD layers) are priced by their relative weight error, so
        # the Linear curves must be relative too to be on one scale (and nothing is measured)
        note = (f"error {cal.error!r} replaced by 'relative': {len(others)} planned layers "
                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) have no output-error "
                "curve and are priced by their relative weight error")
        cal = replace(cal, error="relative", pending=None, _done={})
    curves = {}
    for l in layers:  # tables get a curve when the calibration measured their lookups
        if (l.name in names or l.name in tables) and (c := cal.error_curve(l.name, l.module.weight)) is not None:
            curves[l.name] = c
    fields_ = {f.name: getattr(ctx, f.name) for f in dc_fields(PlanContext)}
    missing = sorted(set(names) - set(curves))
    if curves and missing and cal.error != "relative":
        raise ValueError(f"calibration: the {cal.error!r} error needs every SVD Linear to be reached by the "
                         f"calibration batches, but {missing[:6]} were not; exclude them or use error='relative'")
    record = {"variant": cal.variant, "error": cal.error, "batches": cal.batches, "layers": len(curves),
              **({"sequential": cal.sequential} if cal.sequential != "off" else {}),
              **({"weighting": cal.weighting} if cal.weighting != "token" else {}), **({"note": note} if note else {})}
    return DataPlanContext(**fields_, output_errors=curves, error_kind=cal.error), record


def _proxies(l: PlannedLayer, ranks: list, ctx: PlanContext) -> list[float]:
    """Per rank: the layer's output-error curve when the context has one, else the weight
    approximation-error proxy."""
    from ..rank.rules import error_proxies

    curve = getattr(ctx, "output_errors", {}).get(l.name)
    if curve is not None:
        return [float(curve[min(int(r), curve.numel() - 1)]) for r in ranks]
    return error_proxies(l.module.weight, l.method, ranks, getattr(l.module, "groups", 1), **l.options)


UNPRICED = ("kept dense: with calibration min_error prices layers by their measured effect on the "
            "output, which the calibration did not measure for this table (plan with raw calibration "
            "batches, or calibrate(..., layers=[... and this table]), or error='relative', to let it compete)")


def _unpriced(l: PlannedLayer, ctx: PlanContext) -> bool:
    """An embedding table in a plan calibrated by an absolute error: its weight-error proxy is
    not on the scale of the Linear layers' output errors, so it cannot take part."""
    errors = getattr(ctx, "output_errors", None)
    return (isinstance(l.module, nn.Embedding) and bool(errors) and l.name not in errors
            and getattr(ctx, "error_kind", "relative") != "relative")


def min_error_ranks(layers: Sequence[PlannedLayer], weights: Any, ctx: PlanContext, kind: str,
                    target: float) -> Choice:
    """Ranks meeting ``target`` of the ``ctx.total`` cost (params, MACs or measured ms: see
    :meth:`PlanContext.candidates`) with the least sum of weighted per-layer error proxies
    (see ``rank.rules.min_error_allocation``)."""
    from ..rank.rules import min_error_allocation

    weights = _layer_weights(weights, layers)
    target = ctx.feasible(target)
    cands = {l.name: ([] if _unpriced(l, ctx) else ctx.candidates(l)) for l in layers}
    dense = {l.name: ctx.dense_cost(l) for l in layers}
    costs, errors = [], []
    for l in layers:
        c = cands[l.name]
        errs = _proxies(l, [r for r, _ in c], ctx) if c else []
        costs.append([x for _, x in c] + [dense[l.name]])
        errors.append(errs + [0.0])
    total = ctx.total
    fixed = total - sum(dense.values())
    cheapest = fixed + sum(min(c) for c in costs)
    if cheapest > target * total * 1.0000001:
        raise ValueError(f"{kind}={target} is unreachable: with the smallest rank on every compressible "
                         f"layer the model keeps {cheapest / total:.4f} of its cost (best reachable "
                         f"{kind}={cheapest / total:.4f})")
    idx = min_error_allocation(costs, errors, target * total - fixed, [weights[l.name] for l in layers])
    chosen, notes = {}, {}
    for l, i, errs in zip(layers, idx, errors):
        if i == len(cands[l.name]):
            chosen[l.name] = ("kept dense: the min-error allocation keeps it dense" if cands[l.name]
                              else UNPRICED if _unpriced(l, ctx) else ctx.dense_reason(l))
            continue
        chosen[l.name] = cands[l.name][i][0]
        kind_err = (f"{ctx.error_kind} output error" if l.name in getattr(ctx, "output_errors", {})
                    else "error proxy")
        notes[l.name] = f"min_error: {kind_err} {errs[i]:.4g} (weight {weights[l.name]:g})"
    return chosen, notes


def _layer_weights(weights: Any, layers: Sequence[PlannedLayer]) -> dict[str, float]:
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


def accuracy_drop_ranks(ctx: PlanContext, layers: Sequence[PlannedLayer], drop: float,
                        evaluate: Callable[[nn.Module], float]) -> Choice:
    """Per layer, alone on a copy of the model: the cheapest rank candidate whose accuracy
    drop (``evaluate(dense) - evaluate(compressed)``, before any fine-tuning) is <= ``drop``,
    by bisection over the candidates sorted by cost (the drop is assumed monotone in rank)."""
    from tqdm.auto import tqdm

    from ..plan import CompressionPlan
    from ..rank.rules import smallest_passing
    from ..surgery import compress

    model = ctx.model
    base = float(evaluate(model))
    chosen, notes = {}, {}
    bar = tqdm(layers, desc="accuracy-drop ranks", disable=not layers)
    for l in bar:
        cands = rank_candidates(l, ctx.obj)
        cache: dict[int, float] = {}

        def cost_of(i: int) -> float:
            if i not in cache:
                spec = build_spec(l, cands[i][0], ctx.objective)
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
        notes[l.name] = f"accuracy drop {cache[i]:.4f} <= {drop:g} alone (dense {base:.4f})"
    return chosen, notes

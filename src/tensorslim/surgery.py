"""Model surgery: the one place in tensorslim that replaces submodules of a model.

:func:`compress` / :func:`recompress` swap in factorized layers; :func:`set_submodule` is the
primitive they share with other model transforms (e.g. ``methods.prune``)."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .plan import CompressionPlan, Edit, LayerSpec

# op name -> fn(model, edit, weights): replays one structural edit in place. weights=True
# carries the trained tensors over (a method making its model, or compress() replaying a
# plan on the dense model); weights=False only builds the right shapes (load, meta device).
EDIT_OPS: dict[str, Callable[[nn.Module, Edit, bool], None]] = {}


def register_edit(op: str, fn: Callable[[nn.Module, Edit, bool], None]) -> None:
    """Register the function that replays edits named ``op`` (see :class:`~tensorslim.plan.Edit`);
    a method registers its ops when its module is imported. The function must validate its
    edit before it changes anything and raise ValueError naming the edit's target otherwise."""
    if not isinstance(op, str) or not op or not callable(fn):
        raise TypeError(f"register_edit: expects a non-empty op name and a function, got {op!r}, {fn!r}")
    if EDIT_OPS.get(op, fn) is not fn:
        raise ValueError(f"register_edit: op {op!r} is already registered to {EDIT_OPS[op]!r}")
    EDIT_OPS[op] = fn


def apply_edits(model: nn.Module, edits: Iterable[Edit], *, weights: bool = True) -> nn.Module:
    """Replay ``edits`` on ``model`` in place, in order; returns ``model``."""
    edits = tuple(edits)
    if edits and any(e.op not in EDIT_OPS for e in edits):
        # plugin discovery: the methods register their ops when imported (a runtime lookup,
        # not a dependency of surgery on the pipelines)
        importlib.import_module("tensorslim.methods")
    for e in edits:
        fn = EDIT_OPS.get(e.op)
        if fn is None:
            raise ValueError(f"the plan has an edit {e.op!r} (on {e.target!r}) that no method "
                             f"registers; known: {', '.join(sorted(EDIT_OPS)) or 'none'}")
        fn(model, e, weights)
    return model


def build_layer(module: nn.Module, spec: LayerSpec, *, decompose: bool = True,
                data: Mapping[str, Any] | None = None) -> nn.Module:
    """The factorized replacement of ``module`` described by ``spec`` (a new module).

    ``decompose=True`` decomposes the trained weights (``from_dense``);
    ``decompose=False`` only builds the right shapes (``like``), for loading a checkpoint.
    ``data``: extra ``from_dense`` keywords from calibration data (e.g. ``gram`` for a
    data-aware SVD; see :meth:`tensorslim.calibration.Calibration.layer_options`).
    Every ValueError / TypeError (a wrong layer type or shape, a bad rank, non-finite
    weights, ...) is raised again prefixed with ``layer <name> (<type>): ``.
    """
    try:
        return _build(module, spec, decompose, data or {})
    except (ValueError, TypeError) as e:
        msg = f"layer {spec.name} ({type(module).__name__}): {e}"
        try:  # keep the error's own class (e.g. LayerTypeError) when it takes a message
            err = type(e)(msg)
        except Exception:  # noqa: BLE001 - an exception class with another signature
            err = (ValueError if isinstance(e, ValueError) else TypeError)(msg)
        raise err from e


def _build(module: nn.Module, spec: LayerSpec, decompose: bool, data: Mapping[str, Any]) -> nn.Module:
    from .layers import layer_for

    problem = _mismatch(module, spec)
    if problem:
        raise ValueError(problem)
    cls = layer_for(spec.method, module)
    opts: dict[str, Any] = dict(spec.options)
    if not decompose:
        return cls.like(module, spec.rank, **opts)
    return cls.from_dense(module, spec.rank, **opts, **data)


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module.weight`` when it is a tensor (dense layers), else ``()``."""
    w = getattr(module, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) else ()


def _mismatch(module: nn.Module | None, spec: LayerSpec) -> str:
    """Why ``module`` is not the layer ``spec`` was planned for ("" when it is)."""
    if module is None:
        return "the model does not have this layer"
    if spec.compressed and type(module).__name__ != spec.layer_type:
        return f"the plan expects a {spec.layer_type}, the model has a {type(module).__name__}"
    shape = weight_shape(module)  # () for a layer since factorized: not another model
    if spec.weight_shape and shape and shape != tuple(spec.weight_shape):
        return (f"the plan expects a {spec.layer_type} with weight shape {tuple(spec.weight_shape)}, "
                f"the model's has shape {shape}")
    return ""


def weight_ties(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """For each layer in ``names`` that holds a Parameter also held by a module outside it
    (tied weights, e.g. an embedding tied to an LM head), the qualified name of that other
    Parameter. A module registered under several names (called twice) is not a tie."""
    holders: dict[int, list[str]] = {}
    for qual, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(qual)
    modules = dict(model.named_modules(remove_duplicate=False))
    ties = {}
    for name in names:
        inside = {id(m) for m in modules[name].modules()}
        for p in modules[name].parameters():
            other = [q for q in holders[id(p)] if id(modules[q.rpartition(".")[0]]) not in inside]
            if other:
                ties[name] = other[0]
                break
    return ties


def tie_reason(other: str) -> str:
    """The reason a layer whose weight is tied to the Parameter ``other`` stays dense."""
    layer = other.rpartition(".")[0] or "the model itself"
    return f"kept dense: weight shared with {layer} ({other}); compressing it would break the tie"


def _check_fits(model: nn.Module, plan: CompressionPlan, modules: Mapping[str, nn.Module]) -> None:
    """ValueError unless every compressed layer of ``plan`` is in ``model`` with the planned
    type and weight shape, no kept layer's weight shape differs, and no compressed layer
    holds a tied weight."""
    problems = []
    for spec in plan.layers:
        if spec.compressed or spec.weight_shape:
            why = _mismatch(modules.get(spec.name), spec)
            if why:
                problems.append(f"layer {spec.name}: {why}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"the plan does not fit this model (was it made for another model?): "
                         f"{'; '.join(problems[:5])}{more}")
    ties = weight_ties(model, [s.name for s in plan.compressed])
    if ties:
        raise ValueError("; ".join(f"layer {n}: {tie_reason(o)}" for n, o in ties.items()))


def compress(
    model: nn.Module, plan: CompressionPlan, *, decompose: bool = True, progress: bool = True,
    calibration: Any = None,
) -> nn.Module:
    """Replace every layer the plan compresses with its factorized form; returns ``model``.

    This mutates ``model`` in place (copy it first to keep the dense one). Each new layer
    records its weight approximation error in ``layer.approx_error``. A plan made for another
    model (a layer missing, of another type or weight shape) or one that would compress a
    layer with a tied weight is refused with a ValueError before anything changes. A module
    registered under several names is replaced under all of them by one new module.
    The plan's structural ``edits`` (pruned filters, replaced blocks) are replayed first.
    ``calibration``: model inputs (an iterable of batches: tensors, tuples of positional
    tensors or dicts of keyword tensors) or a ready :class:`tensorslim.calibration.Calibration`;
    the SVD Linear layers are then decomposed data-aware (least error of their outputs on the
    inputs the dense model feeds them: SVD-LLM whitening, or ASVD as the Calibration says);
    with the Calibration's ``sequential`` mode (default ``"outputs"``) layer after layer on
    the inputs of the partially compressed model (:mod:`tensorslim._calib_sequential`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"compress expects a CompressionPlan, got {type(plan).__name__}")
    apply_edits(model, plan.edits, weights=decompose)
    modules = dict(model.named_modules())
    _check_fits(model, plan, modules)
    specs = plan.compressed
    data, seq = _calibration_options(model, specs, modules, calibration, progress) if decompose else ({}, None)
    if seq is not None:  # fitted layer after layer on the partially compressed model
        new = seq(specs)
        replace_modules(model, {modules[n]: layer for n, layer in new.items()})
        return model
    new = {}
    from time import perf_counter

    bar = tqdm(specs, desc="decomposing" if decompose else "building",
               disable=not progress or not specs)
    done = ""  # the bar shows the layer being built and how long the previous one took
    for spec in bar:
        bar.set_postfix_str(f"{spec.name}{done}")
        start = perf_counter()
        new[spec.name] = build_layer(modules[spec.name], spec, decompose=decompose,
                                     data=data.get(spec.name))
        took = f"{spec.name} {perf_counter() - start:.1f}s"
        bar.set_postfix_str(took)
        done = f" (last: {took})"
    replace_modules(model, {modules[n]: layer for n, layer in new.items()})
    return model


def _calibration_options(model: nn.Module, specs: Iterable[LayerSpec], modules: Mapping[str, nn.Module],
                         calibration: Any, progress: bool) -> tuple[dict[str, dict[str, Any]], Any]:
    """Per SVD Linear of the plan: the data-aware ``from_dense`` keywords (collected on the
    still-dense ``model``; {} without calibration), and for a sequential Calibration instead
    a function specs -> built layers (else None)."""
    if calibration is None:
        return {}, None
    from .calibration import as_calibration, sequential_layers

    names = [s.name for s in specs if s.method == "svd" and isinstance(modules[s.name], nn.Linear)]
    if not names:
        return {}, None
    cal = as_calibration(model, calibration, layers=names, progress=progress)
    if cal.sequential != "off":
        return {}, lambda todo: sequential_layers(model, todo, list(cal.inputs), cal.sequential, build=build_layer,
                                                  variant=cal.variant, alpha=cal.alpha, damping=cal.damping,
                                                  row_weights=cal.row_weights, weighting=cal.weighting,
                                                  progress=progress)
    return {n: cal.layer_options(n) for n in names}, None


def layer_errors(model: nn.Module, plan: CompressionPlan) -> dict[str, float]:
    """The weight approximation error ``approx_error`` that each of the plan's compressed
    layers recorded in ``model`` when it was decomposed (layers built without decomposing,
    e.g. by ``tensorslim.load``, have none and are left out). For ``plan.with_errors``."""
    modules = dict(model.named_modules())
    out = {}
    for spec in plan.compressed:
        err = getattr(modules.get(spec.name), "approx_error", None)
        if err is not None:
            out[spec.name] = float(err)
    return out


def recompress(
    model: nn.Module,
    ranks: Mapping[str, Any],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace already-factorized layers by their re-compression at new (smaller) ranks
    (``layer.recompress(rank, **options[name])``, MUSCO's further stages); returns ``model``.

    ``ranks``: qualified layer name -> rank. Mutates ``model`` in place; every new layer is
    built before any is swapped in, and records ``approx_error`` relative to the layer it
    replaces.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recompress expects an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    new = {}
    for name, rank in tqdm(ranks.items(), desc="re-compressing", disable=not progress or not ranks):
        layer = modules.get(name)
        if layer is None:
            from .plan import unknown_names_error

            raise unknown_names_error("recompress: ranks", [name], list(modules))
        if not callable(getattr(layer, "recompress", None)):
            raise ValueError(f"recompress: layer {name} is a {type(layer).__name__}, which cannot be "
                             f"re-compressed; accepted: TuckerConv*, CPConv*, LowRankLinear, LowRankConv*")
        try:
            new[name] = layer.recompress(rank, **dict((options or {}).get(name, {})))
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name}: {e}") from None
    replace_modules(model, {modules[n]: layer for n, layer in new.items()})
    return model


def replace_modules(model: nn.Module, new: Mapping[nn.Module, nn.Module]) -> None:
    """Put each new module in place of the old one, under every name the old one has (a
    module registered twice stays one shared module)."""
    for name, old in list(model.named_modules(remove_duplicate=False)):
        if name and old in new:
            set_submodule(model, name, new[old])


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model`` (in place), in the train / eval
    mode of the module it replaces and on the device of that module's parameters.

    ValueError when ``model`` has no submodule ``name`` (names as ``model.named_modules()``
    gives them; ``""``, the model itself, cannot be replaced); TypeError when ``module`` is
    not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"set_submodule: module must be an nn.Module, got {type(module).__name__}")
    parent_name, _, child = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    old = getattr(parent, child, None) if parent is not None and child else None
    if not isinstance(old, nn.Module):
        raise ValueError(f"set_submodule: {type(model).__name__} has no submodule {name!r}; "
                         f"accepted: a non-empty qualified name from model.named_modules()")
    module.train(old.training)
    p = next(old.parameters(), None)
    if p is not None:
        module.to(device=p.device)
    setattr(parent, child, module)

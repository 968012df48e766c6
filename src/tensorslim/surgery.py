"""Model surgery: the one place in tensorslim that replaces submodules of a model."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn
from tqdm.auto import tqdm

from .plan import CompressionPlan, LayerSpec


def build_layer(module: nn.Module, spec: LayerSpec, *, decompose: bool = True) -> nn.Module:
    """The factorized replacement of ``module`` described by ``spec`` (a new module).

    ``decompose=True`` decomposes the trained weights (``from_conv`` / ``from_linear``);
    ``decompose=False`` only builds the right shapes (``like``), for loading a checkpoint.
    """
    from .layers import layer_for

    if type(module).__name__ != spec.layer_type:
        raise ValueError(
            f"layer {spec.name}: the plan expects a {spec.layer_type}, the model has a {type(module).__name__}"
        )
    try:
        cls = layer_for(spec.method, module)
    except ValueError as e:
        raise ValueError(f"layer {spec.name}: {e}") from None
    opts: dict[str, Any] = dict(spec.options)
    if not decompose:
        return cls.like(module, spec.rank, **opts)
    if isinstance(module, nn.Linear):
        return cls.from_linear(module, spec.rank, **opts)
    return cls.from_conv(module, spec.rank, **opts)


def compress(
    model: nn.Module, plan: CompressionPlan, *, decompose: bool = True, progress: bool = True
) -> nn.Module:
    """Replace every layer the plan compresses with its factorized form; returns ``model``.

    This mutates ``model`` in place (copy it first to keep the dense one). Each new layer
    records its weight approximation error in ``layer.approx_error``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"compress expects a CompressionPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    specs = plan.compressed
    missing = [s.name for s in specs if s.name not in modules]
    if missing:
        raise ValueError(f"the plan names layers the model does not have: {missing}")
    new = {}
    for spec in tqdm(specs, desc="decomposing" if decompose else "building", disable=not progress or not specs):
        new[spec.name] = build_layer(modules[spec.name], spec, decompose=decompose)
    for name, layer in new.items():  # swap only once every layer was built: never half-done
        _set_submodule(model, name, layer)
    return model


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
            raise ValueError(f"recompress: the model has no layer {name!r}")
        if not callable(getattr(layer, "recompress", None)):
            raise ValueError(f"recompress: layer {name} is a {type(layer).__name__}, which cannot be "
                             f"re-compressed; accepted: TuckerConv*, CPConv*, LowRankLinear, LowRankConv*")
        try:
            new[name] = layer.recompress(rank, **dict((options or {}).get(name, {})))
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name}: {e}") from None
    for name, layer in new.items():
        _set_submodule(model, name, layer)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    module.train(old.training)
    p = next(old.parameters(), None)
    if p is not None:
        module.to(device=p.device)
    setattr(parent, child, module)

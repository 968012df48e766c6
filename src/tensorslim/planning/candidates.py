"""Candidate pricing: the compressible layers of a model, their rank spaces, and what each
candidate rank costs. Public, so that every method (make_plan's rules, MUSCO, future ones)
prices ranks the same way.

A :class:`PlannedLayer` is one compressible layer of the dense model: its module, the method
that will factorize it, its traced shapes, and its dense params / MACs (MACs for the example
inputs, with their batch and the number of calls).

Embedding tables (``nn.Embedding``) are compressible layers where a method registers a layer
for them (``svd``: ``LowRankEmbedding``). Their dense lookup costs no MACs and their
factorised form some, so a MAC goal keeps them dense (with that reason) and a params goal
prices them like any layer; a CNN, having none, plans as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from math import prod
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..cost import CostReport
from ..plan import KEEP, LayerSpec, unknown_names_error

_CONV = (nn.Conv1d, nn.Conv2d)
OBJECTIVES = ("params", "macs")  # index 0 / 1 of a (params, MACs) cost pair


@dataclass
class PlannedLayer:
    """A compressible layer being planned (``cls``: the factorized layer class that will
    replace ``module``; ``calls``: how often the example inputs run it)."""

    name: str
    module: nn.Module
    method: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int
    options: dict = field(default_factory=dict)
    cls: type | None = None
    calls: int = 1
    note: str = ""  # why this layer's method differs from the plan's (one line), or ""

    def dense_cost(self, objective: str) -> int:
        """The dense layer's ``objective`` cost (``params`` or ``macs``)."""
        return self.params if objective == "params" else self.macs


def objective_index(objective: str) -> int:
    """0 for ``params``, 1 for ``macs``: the index of that cost in a (params, MACs) pair."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'macs' or 'params', got {objective!r}")
    return OBJECTIVES.index(objective)


def auto_method(module: nn.Module) -> str:
    """``auto``: Tucker-2 for convs with a spatial kernel, SVD for Linear, 1x1 convs and
    embedding tables."""
    if isinstance(module, _CONV) and prod(module.kernel_size) > 1:
        return "tucker"
    return "svd"


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` balanced integer factors (largest first), e.g. 4096,3 -> 16,16,16."""
    from ..layers.tt import factorize as _f

    return tuple(_f(n, d))


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
    from ..layers import FactorizedLayer

    include, exclude = sel
    if isinstance(mod, FactorizedLayer):
        return "already factorized"
    if include is not None and not any(fnmatch(name, g) for g in include) or \
            exclude is not None and any(fnmatch(name, g) for g in exclude):
        return "not selected by include/exclude"
    if name in ties:
        from ..surgery import tie_reason

        return tie_reason(ties[name])
    if not out_shape or macs == 0 and not isinstance(mod, nn.Embedding):  # a lookup has no MACs
        return "not called by the example inputs"
    return ""


def _unsupported(method: str, mod: nn.Module, err: Exception) -> str:
    """The one-line reason a layer no factorized layer of ``method`` can replace stays dense."""
    from ..layers.registry import LAYERS

    kind = type(mod).__name__
    methods = sorted({m for m, t in LAYERS if isinstance(mod, t)})
    if not methods:
        return f"kept dense: no factorized {kind} in tensorslim (counted, not compressed)"
    if method not in methods:
        return f"kept dense: no {method} layer for {kind} (its methods: {', '.join(methods)})"
    return one_line(str(err))


def one_line(text: str, limit: int = 100) -> str:
    """``text`` as a plan reason: its first line, cut at the last clause (``: ``, ``; ``,
    ``, ``) that ends within ``limit`` characters when longer."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = max(line.rfind(sep, 0, limit) for sep in (": ", "; ", ", "))
    return line[:cut] if cut > 0 else line[:limit - 3] + "..."


def collect_layers(model: nn.Module, method: str, report: CostReport, goal: Mapping[str, Any] | None = None
                   ) -> tuple[list[PlannedLayer], list[LayerSpec]]:
    """Split the counted layers of ``report`` into compressible ones and specs of the layers
    kept dense (each with its reason). ``goal`` may hold make_plan's ``include``, ``exclude``,
    ``tt_order`` and ``cp_epc``.

    ValueError for an include/exclude glob that matches no layer, and for a layer to be
    compressed whose weights are not finite."""
    from ..layers import layer_for
    from ..surgery import weight_shape, weight_ties

    goal = goal or {}
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
        m = layer_method(method, mod)
        try:
            cls = layer_for(m, mod)
        except ValueError as e:
            kept.append(LayerSpec(**keep, reason=_unsupported(m, mod, e)))
            continue
        _check_finite(lc.name, mod)
        layer = PlannedLayer(lc.name, mod, m, lc.in_shape, lc.out_shape, lc.params, lc.macs, {}, cls,
                             note=MATRIX_NOTE.get(method, "") if m != method else "")
        if m == "tt":
            options = tt_options(mod, int(goal.get("tt_order", 3)))
            if isinstance(options, str):
                kept.append(LayerSpec(**keep, reason=options))
                continue
            layer.options = options
        if m == "cp" and goal.get("cp_epc"):
            layer.options = {"epc": True}  # CPD-EPC in from_conv (see layers/cp.py)
        dense_macs = _dense_call_macs(mod, lc.out_shape)
        layer.calls = max(1, round(lc.macs / dense_macs)) if dense_macs else 1
        todo.append(layer)
    return todo, kept


def tt_options(module: nn.Module, d: int) -> dict | str:
    """The TT modes of ``module``: each dimension (Linear: in / out features; conv: in / out
    channels per group) split into ``d`` balanced factors (``factorize``). A reason to keep
    the layer dense when a dimension is 1 or prime (fewer than 2 factors > 1: the TT has a
    single real core, nothing to tensorize). Dimensions are never padded: a padded layer would
    take a different input, so it would not be exact."""
    if isinstance(module, nn.Linear):
        dims = {"in_features": module.in_features, "out_features": module.out_features}
    else:
        g = module.groups
        dims = {"in_channels/groups" if g > 1 else "in_channels": module.in_channels // g,
                "out_channels/groups" if g > 1 else "out_channels": module.out_channels // g}
    modes = {k: factorize(n, d) for k, n in dims.items()}
    for k, n in dims.items():
        if sum(f > 1 for f in modes[k]) < 2:
            why = "prime" if n > 1 else "a single one"
            return f"kept dense: {k}={n} has no TT factorisation ({why}; padding would change the layer)"
    ins, outs = modes.values()
    if isinstance(module, nn.Linear):  # TTLinear picks its cheaper contraction direction itself
        return {"in_modes": ins, "out_modes": outs}
    return _cheapest_order(module, ins, outs)


def _cheapest_order(conv: nn.Module, ins: tuple[int, ...], outs: tuple[int, ...]) -> dict:
    """TTConv2d contracts its channel modes last to first, so their order sets its MACs
    (not its params): of the in / out modes each ascending or descending, the order with the
    fewest MACs at TT-rank 8 (per output pixel)."""
    from ..layers.ttconv import TTConv2d

    best = None
    for a in (ins, ins[::-1]):
        for b in (outs, outs[::-1]):
            extent = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size))
            macs = TTConv2d.cost(conv, 8, (conv.in_channels, *extent), (), in_modes=a, out_modes=b)[1]
            if best is None or macs < best[0]:
                best = (macs, a, b)
    return {"in_modes": best[1], "out_modes": best[2]}


def is_matrix_layer(module: nn.Module) -> bool:
    """A Linear layer or a 1x1 conv: its weight is a matrix (out, in) applied per position."""
    return isinstance(module, nn.Linear) or isinstance(module, _CONV) and prod(module.kernel_size) == 1


# why a matrix layer gets SVD under a tensor method (the spec's reason, one line)
MATRIX_NOTE = {"tucker": "svd: a matrix's Tucker-2 is its truncated SVD",
               "cp": "svd: a matrix's best CP is its truncated SVD"}


def layer_method(method: str, module: nn.Module) -> str:
    """The method that factorizes ``module`` when the plan asks for ``method``: ``auto``
    picks per layer (:func:`auto_method`); ``tucker`` and ``cp`` give Linear layers and 1x1
    convs to SVD (the same factorization for a matrix, with one stage fewer than Tucker-2's
    three; leave them dense with ``exclude``)."""
    if method == "auto":
        return auto_method(module)
    if method in MATRIX_NOTE and is_matrix_layer(module):
        return "svd"
    return method


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


def _dense_call_macs(mod: nn.Module, out_shape: tuple[int, ...]) -> int:
    """MACs of one call of the dense layer (0 for an embedding lookup: calls is then 1)."""
    if isinstance(mod, nn.Embedding):
        return 0
    if isinstance(mod, nn.Linear):
        return prod(out_shape) * mod.in_features
    return prod(out_shape) * (mod.in_channels // mod.groups) * prod(mod.kernel_size)


def layer_cost(layer: PlannedLayer, rank: Any) -> tuple[int, int]:
    """(params, MACs for the example inputs) of ``layer`` factorized at ``rank``; ValueError
    for a rank the layer cannot take."""
    batch = layer.in_shape[0] if layer.in_shape else 1
    p, m = layer.cls.cost(layer.module, rank, layer.in_shape[1:], layer.out_shape[1:], **layer.options)
    return int(p), int(m) * batch * layer.calls


def rank_candidates(layer: PlannedLayer, objective: str | int = "macs") -> list[tuple[Any, tuple[int, int]]]:
    """``(rank, (params, MACs))`` for the valid ranks of ``layer`` whose ``objective`` cost
    (``params`` or ``macs``; or 0 / 1) is below dense, sorted by that cost."""
    obj = objective if isinstance(objective, int) else objective_index(objective)
    dense = (layer.params, layer.macs)
    out = []
    for r in rank_space(layer):
        try:
            c = layer_cost(layer, r)
        except ValueError:
            continue
        if c[obj] < dense[obj]:
            out.append((r, c))
    out.sort(key=lambda rc: (rc[1][obj], rc[1][1 - obj]))
    return out


def rank_space(layer: PlannedLayer) -> list[Any]:
    """The ranks worth pricing for ``layer``, smallest first (some may be invalid for a
    grouped conv: :func:`layer_cost` rejects those). The last is the full rank (CP: the
    rank with about the dense layer's parameters). A layer class with a classmethod
    ``rank_space(module, **options)`` gives its own list."""
    mod, m = layer.module, layer.method
    own = getattr(layer.cls, "rank_space", None)
    if callable(own):  # a layer class may define its own candidate ranks (smallest first)
        return list(own(mod, **layer.options))
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
    raise ValueError(f"layer {layer.name}: no rank space for method {m!r}")


def build_spec(layer: PlannedLayer, rank: Any, objective: str = "macs", reason: str = "") -> LayerSpec:
    """The plan entry for ``layer`` at ``rank``: compressed, or kept dense when ``rank`` is a
    string (the reason) or would not reduce the ``objective`` cost. ValueError naming the
    layer for a rank it cannot take."""
    from ..surgery import weight_shape

    obj = objective_index(objective)
    base = dict(name=layer.name, layer_type=type(layer.module).__name__, params_before=layer.params,
                macs_before=layer.macs, in_shape=layer.in_shape, out_shape=layer.out_shape,
                weight_shape=weight_shape(layer.module))
    if isinstance(rank, str):  # a reason to keep the layer dense
        return LayerSpec(**base, method=KEEP, rank=None, params_after=layer.params, macs_after=layer.macs,
                         reason=_no_rank_reason(layer, rank, objective))
    try:
        p, m = layer_cost(layer, rank)
    except ValueError as e:
        raise ValueError(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    if (p, m)[obj] >= (layer.params, layer.macs)[obj]:
        return LayerSpec(**base, method=KEEP, rank=None, params_after=layer.params, macs_after=layer.macs,
                         reason=_tt_reason(layer, rank, (p, m)) or
                         f"kept dense: {layer.method} at rank {rank} would not reduce {objective} "
                         f"({(p, m)[obj]:,d} >= {(layer.params, layer.macs)[obj]:,d})")
    if m > layer.macs:  # chosen knowingly (objective params): the plan says so
        warn = f"{layer.method} costs more MACs than dense ({m:,d} > {layer.macs:,d})"
        if warn not in layer.note:  # make_plan appends the layer's note to the rule's
            layer.note = "; ".join(n for n in (layer.note, warn) if n)
        reason = "; ".join(n for n in (reason, warn) if n)
    return LayerSpec(**base, method=layer.method, rank=rank, params_after=p, macs_after=m,
                     options=dict(layer.options), reason=reason)


def _tt_reason(layer: PlannedLayer, rank: Any, cost: tuple[int, int]) -> str:
    """Why a TT layer that saves params at ``rank`` is kept under objective ``macs`` ("" when
    it does not save params)."""
    p, m = cost
    if layer.method != "tt" or p >= layer.params or m < layer.macs:
        return ""
    return (f"kept dense: TT at rank {rank} saves params but costs more MACs ({m:,d} >= {layer.macs:,d}): "
            f"use objective='params'")


EMBEDDING_MACS = ("kept dense: an embedding lookup costs no MACs and its factorised form r*D per token, "
                  "so only objective='params' / target_params can compress it")


def _no_rank_reason(layer: PlannedLayer, reason: str, objective: str = "macs") -> str:
    """``reason``, or for a TT layer whose smallest rank saves params but not MACs, that; for
    an embedding under a MAC goal, why no rank can reduce its MACs."""
    if isinstance(layer.module, nn.Embedding) and objective != "params" and reason.startswith("kept dense: no rank"):
        return EMBEDDING_MACS
    if layer.method != "tt" or not reason.startswith("kept dense: no rank"):
        return reason
    space = rank_space(layer)
    return _tt_reason(layer, space[0], layer_cost(layer, space[0])) or reason if space else reason

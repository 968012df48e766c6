"""Layer-aware rank helpers shared by the rank rules and by methods: a rank given as a
fraction or a number made valid for a layer, and the energy rank of a layer's weight."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .candidates import PlannedLayer, layer_cost, rank_space


def manual_rank(layer: PlannedLayer, ranks: Any) -> tuple[Any, str]:
    """(rank or reason to keep dense, note) of ``layer`` under ``ranks=`` (make_plan's
    manual rule). A fraction, or one rank for every layer, becomes the nearest valid rank of
    each layer (``valid_rank``: multiples of groups, within bounds); a rank given for this
    layer by name must be valid as it is."""
    named = isinstance(ranks, Mapping)
    if named and layer.name not in ranks:
        return "no rank given for this layer", ""
    r = ranks[layer.name] if named else ranks
    if isinstance(r, float) and not isinstance(r, bool):
        if not 0 < r <= 1:
            raise ValueError(f"layer {layer.name}: a fractional rank must be in (0, 1], got {r}")
        return nearest_valid_rank(layer, _fraction_value(layer, r))
    if isinstance(r, list):
        r = tuple(r)
    if layer.method == "tucker" and isinstance(r, int):
        r = (r, r)
    if not named:
        return nearest_valid_rank(layer, r)
    try:
        layer_cost(layer, r)  # validates the rank against the layer
    except ValueError as e:
        raise ValueError(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    return r, ""


def _fraction_value(layer: PlannedLayer, f: float) -> Any:
    """The real-valued rank ``f`` of the way up the layer's rank space (tucker: per mode)."""
    mod = layer.module
    if layer.method == "tucker":
        return (f * mod.in_channels, f * mod.out_channels)
    return f * len(rank_space(layer))


def nearest_valid_rank(layer: PlannedLayer, value: Any) -> tuple[Any, str]:
    """(the valid rank nearest to the real-valued ``value``, a note when it is not ``value``
    rounded). ValueError / TypeError naming the layer when there is none."""
    try:
        r = layer.cls.valid_rank(layer.module, value, **layer.options)
        layer_cost(layer, r)
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {layer.name} ({type(layer.module).__name__}): {e}") from None
    naive = tuple(max(1, round(v)) for v in value) if isinstance(value, tuple) else max(1, round(value))
    return r, "" if r == naive else f"rank {naive} is not valid for this layer; nearest valid rank {r}"


def fraction_rank(layer: PlannedLayer, f: float) -> Any:
    """The valid rank ``f`` (in (0, 1]) of the way up the layer's rank space."""
    return nearest_valid_rank(layer, _fraction_value(layer, f))[0]


def energy_rank(layer: PlannedLayer, energy: float) -> Any:
    """The fewest singular values keeping ``energy`` of the squared singular values (per
    unfolding for tucker; TT-SVD for tt), raised to the next valid rank (groups)."""
    from ..tensor import unfold

    w = layer.module.weight.detach().double()
    if layer.method == "svd":
        return _at_least(layer, _keep_energy(w.reshape(w.shape[0], -1), energy))
    if layer.method == "tucker":
        return _at_least(layer, (_keep_energy(unfold(w, 1), energy), _keep_energy(unfold(w, 0), energy)))
    if layer.method == "tt":
        return _at_least(layer, _tt_energy_rank(w, layer, energy))
    raise ValueError(
        f"layer {layer.name}: the energy rule works for svd, tucker and tt; CP has no nested "
        f"optimal truncation, so use ranks= or target_macs=/target_params= with method 'cp'"
    )


def _tt_energy_rank(w: torch.Tensor, layer: PlannedLayer, energy: float) -> int:
    """The largest TT-SVD bond rank keeping ``energy`` (error <= sqrt(1 - energy)); for a conv
    the TT of :class:`~tensorslim.layers.TTConv2d` (spatial core first), the largest over groups."""
    from ..tensor import tt_matrix, tt_svd

    eps = (1.0 - energy) ** 0.5
    ins, outs = layer.options["in_modes"], layer.options["out_modes"]
    if w.dim() == 2:
        return max(tt_matrix(w, ins, outs, eps=eps).ranks)
    from ..layers.ttconv import kernel_tt_tensors

    return max(max(tt_svd(t, eps=eps).ranks) for t in kernel_tt_tensors(w, layer.module.groups, ins, outs))


def _at_least(layer: PlannedLayer, r: Any) -> Any:
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

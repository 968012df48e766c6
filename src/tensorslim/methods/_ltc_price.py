"""The per-layer scale of LTC's C-step rank price: how much one unit of a layer's squared
weight error is worth, so that the truncation errors of different layers are compared on one
scale when the C-step trades them against MACs.

The unweighted C-step picks, per layer k, the rank minimising
``lam C_k(r) + mu/2 ||v_k - Pi_r(v_k)||^2`` (``v_k = W_k - phi_k / mu``). A squared weight
error is not worth the same in every layer (a small, MAC-heavy early kernel loses much more
accuracy per unit of it than a large late one), so the weighted C-step minimises

    lam C_k(r) + mu/2 s_k ||v_k - Pi_r(v_k)||^2     (s_k > 0, one number per layer)

Dividing by ``s_k`` shows this is exactly the C-step of the augmented Lagrangian

    Q~ = L(W) + lam sum_k C_k(r_k) / s_k + mu/2 sum_k ||W_k - Theta_k - phi_k / mu||^2

i.e. LC for a cost model whose price per MAC is ``lam / s_k`` in layer k: the penalty, the
W-step, the projection ``Theta_k = Pi_r(v_k)`` at the chosen rank (a per-layer scalar does
not change the best Theta of a given rank) and the multiplier update ``phi <- phi - mu (W -
Theta)`` are all unchanged; with a cost target ``lam`` is still bisected on the real cost
``sum_k C_k``. A second reading: if the loss near W is ``L(Theta) ~ L(W) + s_k/2 ||W_k -
Theta_k||^2`` per layer (an isotropic curvature per layer), the weighted error is the loss
the C-step's truncation costs.

The weights (``price``):

- ``weight``: ``s_k = 1`` (the plain LC C-step: weight-space error);
- ``relative``: ``s_k = 1 / ||W_k||^2`` of the dense weights (the relative error the
  one-shot ``min_error`` planner allocates ranks by);
- ``fisher``: ``s_k`` = the mean over the layer's elements of the squared gradient of the
  dense model's cross-entropy on ``price_batches`` training batches (a diagonal empirical
  Fisher, averaged per layer: the isotropic curvature above);
- ``measured``: ``s_k = ||f(x; W with Theta_k) - f(x; W)||^2 / ||W_k - Theta_k||^2``, the
  squared change of the dense model's logits (eval mode, summed over ``price_batches``
  training batches, per sample) when only layer k is replaced by a probe projection
  ``Theta_k``, per unit of its squared weight error. The probe is the layer's least-error
  rank costing at most ``probe`` of its dense cost (the target fraction; 1/4 with ``lam``).

Every kind is scaled so that ``sum_k s_k ||W_k||^2 = sum_k ||W_k||^2`` (the weighted and the
plain errors of the whole model agree at "every layer lost"), which keeps ``lam`` on the plain
C-step's scale; with a target only the ratios matter.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import _ltc_core as core

PRICES = ("weight", "relative", "fisher", "measured")


def _batches(loader: Any, n: int) -> list:
    """The first ``n`` batches ``(x, y)`` of ``loader`` at a fixed epoch (deterministic)."""
    from ._musco_state import _StageLoader

    out = []
    for batch in _StageLoader(loader, 7_777_777, start=0):
        out.append(batch)
        if len(out) >= n:
            break
    if not out:
        raise ValueError("ltc: price needs at least one training batch; train_loader is empty")
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fisher(model: nn.Module, layers: list, batches: list) -> dict[str, float]:
    """Per layer: the mean over its weight's elements of the squared gradient of the
    cross-entropy (eval mode), averaged over ``batches``."""
    weights = [model.get_submodule(l.name).weight for l in layers]
    sums = [0.0] * len(layers)
    was, dev = model.training, _device(model)
    model.eval()
    try:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] += float(g.detach().double().square().mean())
    finally:
        model.train(was)
    return {l.name: s / len(batches) for l, s in zip(layers, sums)}


def probe_rank(layer: core.LCLayer, spec: core.Spectrum, fraction: float) -> Any:
    """The least-error rank of ``layer`` costing at most ``fraction`` of its dense cost (its
    cheapest rank when none does)."""
    cost, err = layer.cost.reshape(-1), spec.err.reshape(-1)
    ok = cost <= fraction * layer.dense_cost
    i = int(torch.argmin(torch.where(ok, err, err.new_full((), float("inf"))))) if bool(ok.any()) \
        else int(torch.argmin(cost))
    return core._unflat(layer, i)


@torch.no_grad()
def measured(model: nn.Module, layers: list, batches: list, fraction: float
             ) -> dict[str, float]:
    """Per layer: the squared change of the logits (eval mode, per sample) when only that
    layer's weight is replaced by its probe projection, over the probe's squared error."""
    was, dev = model.training, _device(model)
    model.eval()
    out = {}
    try:
        xs = [x.to(dev) for x, _ in batches]
        refs = [model(x).double() for x in xs]
        n = sum(x.shape[0] for x in xs)
        for l in layers:
            w = model.get_submodule(l.name).weight
            spec = core.spectrum(l, w)
            theta = core.project(l, spec, w, probe_rank(l, spec, fraction))
            err = float((w.double() - theta.double()).square().sum())
            keep = w.detach().clone()
            w.copy_(theta)
            try:
                change = sum(float((model(x).double() - r).square().sum()) for x, r in zip(xs, refs))
            finally:
                w.copy_(keep)
            out[l.name] = change / n / err if err > 0 else 0.0
    finally:
        model.train(was)
    return out


def layer_weights(price: str, model: nn.Module, layers: list, loader: Any, batches: int,
                  fraction: float) -> dict[str, float]:
    """``s_k`` per layer name for ``price`` (see the module doc), normalised so that
    ``sum_k s_k ||W_k||^2 = sum_k ||W_k||^2``; rank 0's values in a process group."""
    if price not in PRICES:
        raise ValueError(f"ltc: price must be one of {', '.join(PRICES)}, got {price!r}")
    norms = {l.name: float(model.get_submodule(l.name).weight.detach().double().square().sum())
             for l in layers}
    if price == "weight":
        raw = dict.fromkeys(norms, 1.0)
    elif price == "relative":
        raw = {n: 1.0 / v if v > 0 else 0.0 for n, v in norms.items()}
    elif price == "fisher":
        raw = fisher(model, layers, _batches(loader, batches))
    else:
        raw = measured(model, layers, _batches(loader, batches), fraction)
    floor = max(raw.values(), default=0.0) * 1e-12 or 1.0  # keep every s_k > 0
    raw = {n: max(v, floor) for n, v in raw.items()}
    scale = sum(norms.values()) / max(sum(raw[n] * norms[n] for n in norms), 1e-300)
    weights = {n: raw[n] * scale for n in norms}
    if core._group():
        box = [weights]
        dist.broadcast_object_list(box, src=0)
        weights = box[0]
    return weights

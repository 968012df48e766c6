"""Data-aware refit of the channel factors of filter-wise CP layers (NORTON).

The filter-wise CP minimises the error of each filter's WEIGHTS; a rank-R CP of a
(C_in x k x k) filter leaves most of its energy out when the filters are not close to low CP
rank, and no number of ALS sweeps changes that (the error is near the bound of the best
rank-R approximation of the filter's unfoldings). What the network needs is a small error of
each layer's OUTPUT on the inputs it actually sees.

With the spatial factors (B_o, C_o) fixed, a ``FilterCPConv2d``'s output channel o is linear
in its channel factor A_o (S x R) and its bias: ``y_o = sum_{s,r} A_o[s, r] z_{s,o,r} + b_o``,
``z_{s,o,r}`` = input channel s filtered by the spatial kernel of term r
(``FilterCPConv2d.term_responses``). :func:`refit_channel_factors` therefore solves, layer by
layer in execution order, one ridge least-squares problem of size R*S (+1) per filter: the
compressed model's activations in (the layers refitted before it included), the dense
model's output of the same conv out (its kept filters only, when it was pruned) -- the
asymmetric reconstruction of Zhang et al. (TPAMI 2016) that ``tensorslim.reconstruct``
applies to the CP / Tucker / SVD layers' last factor. The ranks, cost and forward are
unchanged; the factors are rebalanced afterwards. Coupled (clustered) layers are left as
they are.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["refit_channel_factors"]


def _targets(student: nn.Module, dense: nn.Module, keeps: Mapping[str, Sequence[int]]
             ) -> dict[str, tuple[Any, nn.Conv2d, torch.Tensor]]:
    """{name: (student layer, dense conv, kept output indices)} of the layers to refit."""
    from ..layers import FilterCPConv2d

    dmods = dict(dense.named_modules())
    out = {}
    for name, layer in student.named_modules():
        if not isinstance(layer, FilterCPConv2d) or layer.clustered or layer.geometry.groups != 1:
            continue
        conv = dmods.get(name)
        if type(conv) is not nn.Conv2d:
            continue
        keep = torch.as_tensor(list(keeps.get(name, range(conv.out_channels))), dtype=torch.long)
        if len(keep) != layer.out_channels:
            raise ValueError(f"refit: {name} has {layer.out_channels} filters but {len(keep)} kept "
                             f"indices of the dense conv's {conv.out_channels}")
        out[name] = (layer, conv, keep)
    return out


def _statistics(student, dense, layer, conv, keep, batches) -> tuple[torch.Tensor, ...]:
    """Per filter o: Gram (T, F, F), cross term (T, F), ||y_o||^2 (T,) and the sample count,
    F = R*S features (+1 for the bias); accumulated in float64 over ``batches``."""
    from ..reconstruct import _capture

    t, r = layer.out_channels, layer.rank
    bias = layer.bias is not None
    gram = cross = yy = None
    samples = 0
    for x in batches:
        xin = _capture(student, layer, x, output=False)
        y = _capture(dense, conv, x, output=True).index_select(1, keep).double()
        if conv.bias is not None:
            y = y - conv.bias.detach().double()[keep].view(1, -1, 1, 1)
        with torch.no_grad():
            z = layer.term_responses(xin).double()  # (B, S, R*T, H', W')
        b, s = z.shape[0], z.shape[1]
        n = b * z.shape[3] * z.shape[4]
        z = z.reshape(b, s, t, r, -1).permute(2, 0, 4, 3, 1).reshape(t, n, r * s)
        if bias:
            z = torch.cat([z, z.new_ones(t, n, 1)], 2)
        yt = y.permute(1, 0, 2, 3).reshape(t, n, 1)
        g, c = z.transpose(1, 2) @ z, (z.transpose(1, 2) @ yt)[..., 0]
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        yy = yt.pow(2).sum((1, 2)) + (0 if yy is None else yy)
        samples += n
    return gram, cross, yy, samples


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam[:, None, None] * eye, cross)


def _rel_error(theta, gram, cross, yy) -> float:
    """sqrt(sum_o ||y_o - Z_o theta_o||^2 / sum_o ||y_o||^2) from the statistics."""
    quad = (theta[:, None, :] @ gram @ theta[:, :, None])[:, 0, 0]
    err = (yy - 2 * (theta * cross).sum(1) + quad).sum().clamp_min(0)
    return float((err / yy.sum().clamp_min(1e-300)).sqrt())


def refit_channel_factors(student: nn.Module, dense: nn.Module, batches: Sequence[Any], *,
                          keeps: Mapping[str, Sequence[int]] | None = None, ridge: float = 1e-4,
                          progress: bool = False) -> list[dict[str, Any]]:
    """Refit (in place) the channel factor and bias of every unclustered groups=1
    ``FilterCPConv2d`` of ``student`` whose dense counterpart (same name in ``dense``) is an
    ``nn.Conv2d`` (see the module docstring). ``batches``: model inputs; ``keeps``: {conv
    name: kept output filter indices of the dense conv} for pruned convs; ``ridge``: relative
    Tikhonov weight. Returns per layer ``{"layer", "error_before", "error_after", "samples"}``
    (relative output errors of the conv on the batches, before and after)."""
    from ..reconstruct import _execution_order

    if not batches:
        raise ValueError("refit_channel_factors: batches is empty; give at least one input batch")
    todo = _targets(student, dense, keeps or {})
    student.eval()
    dense.eval()
    fits = []
    for name in tqdm(_execution_order(student, list(todo), batches[0]), desc="norton refit",
                     disable=not progress):
        layer, conv, keep = todo[name]
        gram, cross, yy, samples = _statistics(student, dense, layer, conv, keep, batches)
        t, r, s = layer.out_channels, layer.rank, layer.in_channels
        w = layer.project_in.weight.detach().double().reshape(t, r * s)
        if layer.bias is not None:  # the intercept fitted is relative to the dense bias
            b0 = layer.bias.detach().double()
            if conv.bias is not None:
                b0 = b0 - conv.bias.detach().double()[keep]
            w = torch.cat([w, b0[:, None]], 1)
        theta = _solve(gram, cross, ridge)
        before, after = _rel_error(w, gram, cross, yy), _rel_error(theta, gram, cross, yy)
        with torch.no_grad():
            layer.project_in.weight.copy_(theta[:, : r * s].reshape(t * r, s, 1, 1))
            if layer.bias is not None:
                b = theta[:, -1] + (0 if conv.bias is None else conv.bias.detach().double()[keep])
                layer.bias.copy_(b)
        layer.rebalance_()
        fits.append({"layer": name, "error_before": round(before, 6),
                     "error_after": round(after, 6), "samples": samples})
    return fits

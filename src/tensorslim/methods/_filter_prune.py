"""Filter scoring, greedy similarity pruning and the "prune_filters" structural edit (NORTON).

Scoring. The filters of a kxk conv (k > 1) get a rank-R CP each (``tensor.filter_cp``) and the
distance matrix ``D = alpha D^A + beta D^B + gamma D^C`` of largest principal angles between
their factor subspaces (``tensor.filter_distances``). Greedy removal (Pham et al.): take the
closest remaining pair, remove the member whose summed distance to the other remaining filters
is smaller (the more redundant one), repeat. A 1x1 conv's filters are removed by ascending L2
norm (as the reference code does). The first ``n`` of the removal order are pruned; the kept
indices are the others, ascending.

Edit. ``Edit("prune_filters", conv, {"keep": [...], "bns": [...], "consumer": name,
"group": g, ...})`` keeps the conv's output filters ``keep`` and slices its BatchNorms and the
input channels of its one consumer (a Conv2d, or a Linear after a flatten: ``g`` = H*W input
features per channel) to match; ``surgery.compress`` / ``tensorslim.load`` replay it (on the
meta device too: slicing needs no values). The graph (which convs may lose filters, their
BatchNorms and consumer) comes from ``methods._prune_graph.find_chains`` (the project's
torch.fx chain finder, shared with ``l1_prune``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..plan import Edit
from ..surgery import register_edit, set_submodule

OP = "prune_filters"


def removal_order(d: torch.Tensor) -> list[int]:
    """Greedy NORTON removal order of the N filters from their distance matrix ``d`` (N, N):
    repeatedly the closest remaining pair (lowest index pair on ties), and of the two the one
    whose row sum of distances to the remaining filters is smaller (the first on ties). The
    last remaining filter is never listed: N-1 indices."""
    n = d.shape[0]
    dd = d.detach().to(torch.float64).clone()
    alive = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    big = float("inf")
    dd.fill_diagonal_(big)
    for _ in range(n - 1):
        flat = int(torch.argmin(dd))
        i, j = divmod(flat, n)
        masked = torch.where(alive[None, :] & (dd < big), dd, torch.zeros_like(dd))
        si, sj = float(masked[i].sum()), float(masked[j].sum())
        drop = i if si <= sj else j
        order.append(drop)
        alive[drop] = False
        dd[drop, :] = big
        dd[:, drop] = big
    return order


def score_conv(conv: nn.Conv2d, rank: int, weights: Sequence[float], n_iter: int,
               seed: int) -> tuple[list[int], dict[str, Any]]:
    """(removal order, statistics) of ``conv``'s filters (see the module docstring)."""
    from ..tensor.filter_cp import filter_cp, filter_distances, max_filter_rank

    w = conv.weight.detach().to(torch.float64)
    if math.prod(conv.kernel_size) == 1 or w.shape[0] < 2:
        norms = w.flatten(1).norm(dim=1)
        order = torch.sort(norms, stable=True).indices.tolist()[: w.shape[0] - 1]
        return order, {"criterion": "l2 norm (1x1 conv)"}
    r = min(rank, max_filter_rank(w.shape[1:]))
    cp = filter_cp(w, r, n_iter=n_iter, seed=seed)
    d = filter_distances(cp, weights)
    off = d[~torch.eye(d.shape[0], dtype=torch.bool)]
    stats = {"criterion": "cpd principal angles", "cp_rank": r,
             "cp_error_mean": round(float(cp.errors.mean()), 6),
             "distance_min": round(float(off.min()), 6), "distance_mean": round(float(off.mean()), 6),
             "distance_max": round(float(off.max()), 6)}
    return removal_order(d), stats


def kept(order: Sequence[int], channels: int, keep: int) -> list[int]:
    """Sorted indices kept when the first ``channels - keep`` of ``order`` are removed."""
    gone = set(order[: channels - keep])
    return [i for i in range(channels) if i not in gone]


def prune_edit(chain: Any, keep: Sequence[int], stats: dict[str, Any]) -> Edit:
    """The ``prune_filters`` edit of one ``_prune_graph.Chain`` keeping ``keep``."""
    args = {"keep": tuple(int(i) for i in keep), "channels": int(chain.channels), "bns": tuple(chain.bns),
            "consumer": chain.consumer, "group": int(chain.group), **stats}
    return Edit(OP, chain.conv, args)


# -- the edit ------------------------------------------------------------------------------------
def _new_conv(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None) -> nn.Conv2d:
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=1, bias=b is not None,
                    padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    ref = bn.weight if bn.affine else bn.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, **kw)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[idx.to(bn.weight.device)])
            new.bias.copy_(bn.bias[idx.to(bn.bias.device)])
        if bn.track_running_stats and bn.running_mean is not None:
            new.running_mean.copy_(bn.running_mean[idx.to(bn.running_mean.device)])
            new.running_var.copy_(bn.running_var[idx.to(bn.running_var.device)])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _slice_consumer(mod: nn.Module, idx: torch.Tensor, group: int) -> nn.Module:
    w = mod.weight.detach()
    if isinstance(mod, nn.Linear):
        cols = (idx.to(w.device)[:, None] * group + torch.arange(group, device=w.device)).flatten()
        new = nn.Linear(len(cols), mod.out_features, bias=mod.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w[:, cols])
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        return new
    b = None if mod.bias is None else mod.bias.detach()
    return _new_conv(mod, w.index_select(1, idx.to(w.device)), b)


def _check(model: nn.Module, edit: Edit) -> tuple[nn.Module, list[nn.Module], nn.Module, torch.Tensor, int]:
    """Validate ``edit`` against ``model`` before anything changes."""
    mods = dict(model.named_modules())
    a = edit.args
    where = f"edit {OP} on {edit.target!r}"
    conv = mods.get(edit.target)
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f"{where}: the target is not a groups=1 Conv2d of the model "
                         f"(got {type(conv).__name__})")
    keep, c, group = [int(i) for i in a.get("keep", ())], conv.out_channels, int(a.get("group", 1))
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= c:
        raise ValueError(f"{where}: keep must be sorted distinct indices in [0, {c}), got "
                         f"{keep[:8]}...")
    if int(a.get("channels", c)) != c:
        raise ValueError(f"{where}: the conv has {c} filters, the edit was made for {a['channels']}")
    bns = [mods.get(n) for n in a.get("bns", ())]
    if any(not isinstance(bn, nn.BatchNorm2d) or bn.num_features != c for bn in bns):
        raise ValueError(f"{where}: bns {list(a.get('bns', ()))} are not BatchNorm2d of {c} features")
    consumer = mods.get(a.get("consumer", ""))
    fan = (consumer.in_features if isinstance(consumer, nn.Linear) else
           consumer.in_channels * group if isinstance(consumer, nn.Conv2d) else -1)
    if fan != c * group:
        raise ValueError(f"{where}: consumer {a.get('consumer')!r} does not take {c} x {group} "
                         f"inputs (a Conv2d / Linear expected)")
    return conv, bns, consumer, torch.tensor(keep, dtype=torch.long), group


def replay(model: nn.Module, edit: Edit, weights: bool) -> None:
    """Apply one ``prune_filters`` edit in place. Slicing carries the trained tensors
    (``weights=True``) and equally builds the right shapes on meta / random tensors
    (``weights=False``), so both run the same code."""
    conv, bns, consumer, idx, group = _check(model, edit)
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()[idx.to(w.device)]
    set_submodule(model, edit.target, _new_conv(conv, w.index_select(0, idx.to(w.device)), b))
    for name, bn in zip(edit.args.get("bns", ()), bns):
        set_submodule(model, name, _slice_bn(bn, idx))
    set_submodule(model, edit.args["consumer"], _slice_consumer(consumer, idx, group))


register_edit(OP, replay)

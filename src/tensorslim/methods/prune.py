"""Structured L1-norm filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets").

A baseline for the tensor methods at the same MAC budget: one global ratio removes the same
fraction of output filters from every prunable ``Conv2d``, keeping the filters with the largest
L1 norms (computed on the original kernels: Li et al.'s "independent" strategy). The following
``BatchNorm2d`` and the input channels of the next consumer are sliced to match, so the result
is a physically smaller dense model.

A conv is prunable when torch.fx shows its output flowing only through BatchNorm2d,
elementwise activations, pooling, dropout and at most one flatten into exactly one ``Conv2d``
(groups=1) or ``Linear``. Convs whose output feeds a residual add (the second conv of a ResNet
block, shortcut convs, the stem of a ResNet) are not pruned; the first conv of each block is.

    res = l1_prune(model, torch.randn(1, 1, 28, 28), target_macs=0.25)
    res.model, res.kept["features.0"], res.macs_after / res.macs_before
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cost import as_tuple, count
from ..surgery import set_submodule
from ._prune_graph import Chain, eval_mode, find_chains, trace

__all__ = ["PruneResult", "l1_prune"]


@dataclass(frozen=True)
class PruneResult:
    """A pruned copy of the model and what was kept.

    ``kept`` maps each pruned conv's name to the sorted indices of the output filters it kept
    (``len`` is the new ``out_channels``); ``skipped`` maps every other Conv2d to the reason it
    was not pruned. MACs are for the ``example_inputs`` as given (with batch), measured by
    :func:`tensorslim.count`. ``ratio`` is the global fraction of filters removed per layer
    (before ``fill`` gives at most one filter back to some layers).
    """

    model: nn.Module
    kept: dict[str, tuple[int, ...]]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    ratio: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)


def _top_l1(conv: nn.Conv2d, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` filters with the largest L1 norms (ties: lower index)."""
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    order = torch.sort(-norms, stable=True).indices[:keep]
    return torch.sort(order).values


def _copy_param(dst: nn.Parameter, src: torch.Tensor, like: nn.Parameter) -> None:
    with torch.no_grad():
        dst.copy_(src)
    dst.requires_grad_(like.requires_grad)


def _slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None,
                in_idx: torch.Tensor | None) -> nn.Conv2d:
    """A new Conv2d keeping output filters ``out_idx`` and input channels ``in_idx``."""
    w = conv.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=1,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    _copy_param(new.weight, w, conv.weight)
    if conv.bias is not None:
        b = conv.bias.detach()
        _copy_param(new.bias, b if out_idx is None else b.index_select(0, out_idx.to(b.device)),
                    conv.bias)
    return new


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    ref = bn.weight if bn.affine else bn.running_mean
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    if bn.affine:
        _copy_param(new.weight, bn.weight.detach()[idx.to(ref.device)], bn.weight)
        _copy_param(new.bias, bn.bias.detach()[idx.to(ref.device)], bn.bias)
    if bn.track_running_stats and bn.running_mean is not None:
        new.running_mean.copy_(bn.running_mean[idx.to(bn.running_mean.device)])
        new.running_var.copy_(bn.running_var[idx.to(bn.running_var.device)])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, group: int) -> nn.Linear:
    """A new Linear keeping the input features of channels ``idx`` (``group`` features each)."""
    w = lin.weight.detach()
    cols = (idx.to(w.device)[:, None] * group + torch.arange(group, device=w.device)).flatten()
    new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None,
                    device=w.device, dtype=w.dtype)
    _copy_param(new.weight, w[:, cols], lin.weight)
    if lin.bias is not None:
        _copy_param(new.bias, lin.bias.detach(), lin.bias)
    return new


def _keeps(chains: list[Chain], ratio: Fraction) -> dict[str, int]:
    """Filters kept per prunable conv at global ``ratio``: ``max(1, C - floor(ratio * C))``."""
    return {ch.conv: max(1, ch.channels - math.floor(ratio * ch.channels)) for ch in chains}


def _pruned(work: nn.Module, chains: list[Chain], keeps: dict[str, int]
            ) -> tuple[nn.Module, dict[str, tuple[int, ...]]]:
    """A pruned deep copy of ``work`` keeping ``keeps[conv]`` filters, and their indices."""
    modules = dict(work.named_modules())
    out_idx: dict[str, torch.Tensor] = {}
    in_idx: dict[str, tuple[torch.Tensor, int]] = {}
    new: dict[str, nn.Module] = {}
    for ch in chains:
        if keeps[ch.conv] >= ch.channels:
            continue
        idx = _top_l1(modules[ch.conv], keeps[ch.conv])
        out_idx[ch.conv] = idx
        in_idx[ch.consumer] = (idx, ch.group)
        new.update({bn: _slice_bn(modules[bn], idx) for bn in ch.bns})
    for name in set(out_idx) | set(in_idx):
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            new[name] = _slice_linear(mod, *in_idx[name])
        else:
            new[name] = _slice_conv(mod, out_idx.get(name), in_idx.get(name, (None,))[0])
    pruned = copy.deepcopy(work)
    for name, mod in new.items():
        set_submodule(pruned, name, mod)
    return pruned, {k: tuple(int(i) for i in v) for k, v in out_idx.items()}


def _layer_macs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, int]:
    """MACs per counted layer (:func:`tensorslim.count`, run in eval mode)."""
    with eval_mode(model):
        return {layer.name: layer.macs for layer in count(model, inputs)}


def _candidates(chains: list[Chain]) -> list[Fraction]:
    """Every ratio at which some layer's kept count changes (the MAC steps), ascending."""
    return sorted({Fraction(p, ch.channels) for ch in chains for p in range(ch.channels)})


def _fill(chains: list[Chain], keeps: dict[str, int], macs: dict[str, int],
          gap: float) -> dict[str, int]:
    """Give back at most one filter per layer, largest MAC cost first, while it fits ``gap``.

    One more filter in ``conv`` adds ``macs[conv] / keep`` (its own output) plus
    ``macs[consumer] / keep`` (the consumer's input), exactly, as MACs are linear in each.
    """
    keeps, macs = dict(keeps), dict(macs)
    todo = [ch for ch in chains if keeps[ch.conv] < ch.channels]
    while todo:
        costs = [(macs[ch.conv] // keeps[ch.conv] + macs[ch.consumer] // keeps[ch.conv], -i, ch)
                 for i, ch in enumerate(todo)]
        fits = [c for c in costs if c[0] <= gap]
        if not fits:
            break
        cost, _, ch = max(fits, key=lambda c: c[:2])
        macs[ch.conv] += macs[ch.conv] // keeps[ch.conv]
        macs[ch.consumer] += macs[ch.consumer] // keeps[ch.conv]
        keeps[ch.conv] += 1
        gap -= cost
        todo.remove(ch)
    return keeps


def _check_args(model: Any, target_macs: Any, exclude: Any) -> set[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"l1_prune expects an nn.Module, got {type(model).__name__}")
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)):
        raise TypeError(f"l1_prune: target_macs must be a number in (0, 1] (fraction of dense "
                        f"MACs), got {type(target_macs).__name__} {target_macs!r}")
    if not 0.0 < target_macs <= 1.0:
        raise ValueError(f"l1_prune: target_macs must be in (0, 1] (fraction of dense MACs), "
                         f"got {target_macs!r}")
    names = [exclude] if isinstance(exclude, str) else list(exclude or ())
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bad = [n for n in names if n not in convs]
    if bad:
        raise ValueError(f"l1_prune: exclude names {bad} that are not Conv2d layers of the "
                         f"model; Conv2d layers: {sorted(convs)}")
    return set(names)


def l1_prune(model: nn.Module, example_inputs: Any, *, target_macs: float,
             exclude: Iterable[str] | str | None = None, fill: bool = True,
             progress: bool = False) -> PruneResult:
    """Prune filters of a copy of ``model`` (left untouched) down to ``target_macs`` x dense MACs.

    ``example_inputs``: a tensor (B, C, H, W) or a tuple of forward args, used for tracing and
    MAC counting. ``exclude``: Conv2d names whose filters are kept (they may still lose input
    channels). One global ratio r is found by bisection over the ratios where the MACs change:
    the smallest r whose pruned model fits ``target_macs * macs_before`` (counted by
    :func:`tensorslim.count`); each prunable conv with C filters keeps the
    ``max(1, C - floor(r*C))`` filters of largest L1 norm. A global ratio moves the MACs in
    coarse steps on narrow nets, so ``fill=True`` then gives at most one filter back per layer
    (costliest first) while the budget still holds: per-layer counts stay within one filter
    of the global ratio and the MACs land close under the target.

    Raises TypeError for a non-module, a non-numeric target or a model torch.fx cannot trace
    (the fx error is named), ValueError for a target outside (0, 1] or one that pruning cannot
    reach (the message gives the smallest reachable fraction).
    """
    names = _check_args(model, target_macs, exclude)
    inputs = as_tuple(example_inputs)
    work = copy.deepcopy(model)
    chains, skipped = find_chains(trace(work, inputs), names)
    dense = _layer_macs(work, inputs)
    budget = target_macs * sum(dense.values())
    ratio, (pruned, kept, macs) = _search(work, chains, inputs, budget, skipped, progress)
    total = sum(macs.values())
    if fill and total < budget:
        keeps = _fill(chains, _keeps(chains, ratio), macs, budget - total)
        filled, filled_kept = _pruned(work, chains, keeps)
        filled_macs = _layer_macs(filled, inputs)
        if sum(filled_macs.values()) <= budget:  # exact by construction; never exceed anyway
            pruned, kept, total = filled, filled_kept, sum(filled_macs.values())
    return PruneResult(pruned, kept, sum(dense.values()), total, _params(model), _params(pruned),
                       float(ratio), skipped)


def _search(work: nn.Module, chains: list[Chain], inputs: tuple[Any, ...], budget: float,
            skipped: dict[str, str], progress: bool) -> tuple[Fraction, tuple[Any, ...]]:
    """Bisect the candidate ratios for the smallest whose pruned model fits ``budget``.

    Returns it and (model, kept indices, MACs per layer); ValueError if none fits.
    """
    cands = _candidates(chains) or [Fraction(0)]
    bar = tqdm(desc="l1_prune search", total=max(2, math.ceil(math.log2(len(cands))) + 2),
               disable=not progress)
    macs_at: dict[int, int] = {}
    best: dict[int, tuple[Any, ...]] = {}  # only the smallest fitting index is kept

    def at(i: int) -> int:
        if i not in macs_at:
            pruned, kept = _pruned(work, chains, _keeps(chains, cands[i]))
            macs = _layer_macs(pruned, inputs)
            macs_at[i] = sum(macs.values())
            if macs_at[i] <= budget and (not best or i < min(best)):
                best.clear()
                best[i] = (pruned, kept, macs)
            bar.update(1)
        return macs_at[i]

    lo, hi = 0, len(cands) - 1
    try:
        if at(hi) > budget:
            dense = at(0)
            raise ValueError(
                f"l1_prune: target_macs={budget / dense:.4g} is not reachable by filter pruning: "
                f"keeping 1 filter in each of the {len(chains)} prunable conv layers (ratio "
                f"{float(cands[hi]):.4f}) "
                f"leaves {at(hi) / dense:.4f} of the dense MACs ({at(hi)} > budget "
                f"{budget:.0f}); the {len(skipped)} other Conv2d layers are not pruned "
                f"({_skip_summary(skipped)})")
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
    finally:
        bar.close()
    return cands[lo], best[lo]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _skip_summary(skipped: dict[str, str], limit: int = 3) -> str:
    items = [f"{k}: {v}" for k, v in list(skipped.items())[:limit]]
    more = len(skipped) - limit
    return "; ".join(items) + (f"; ... {more} more" if more > 0 else "") if items else "none"

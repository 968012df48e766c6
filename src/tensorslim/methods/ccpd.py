"""CONCATENATION / CCPD (Pham, Zniyed & Nguyen): coupled CP decomposition of clustered filters.

Only the abstract and the talk are public; this is built from that description. The coupling
chosen here: the filters of a layer are clustered by the subspace similarity of their
CHANNEL factors (largest principal angle between span(A_i) and span(A_j) of a rank-R
filter-wise CP, average-linkage agglomerative clustering into K clusters), then every cluster
is fitted by one coupled CP in which the channel factor A_k (S x R) is SHARED by the cluster
and the spatial factors B_o (kh x R), C_o (kw x R) stay per filter:
``W_o ~= [[A_k(o), B_o, C_o]]`` (``tensor.coupled_filter_cp``). The layer is
``FilterCPConv2d(..., clusters=...)``: its 1x1 conv has R*K outputs instead of R*T (MACs of
that stage / (T/K)), gathered to the R*T depthwise channels. No filter is pruned: every output
channel is kept (no structural edit), so residual models need no special handling.

``clusters``: fraction K/T of clusters per layer (1.0 = NORTON's decomposition without
pruning), or ``target_macs``: the largest common fraction whose plan fits (bisection).
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import FilterCPConv2d
from ..plan import CompressionPlan
from ..planning import make_plan
from .norton import NortonResult, check_common, check_number, decomposable, finish, one_sample, rank_goal
from ._prune_graph import eval_mode
from .registry import Pipeline, register_pipeline

__all__ = ["ccpd", "merge_sequence", "cut"]


def merge_sequence(d: torch.Tensor) -> list[tuple[int, int]]:
    """Average-linkage agglomerative clustering of N items with distances ``d`` (N, N): the
    N-1 merges (u, v) in order, each merging cluster v into cluster u (named by a member)."""
    n = d.shape[0]
    dd = d.detach().to(torch.float64).clone()
    dd.fill_diagonal_(float("inf"))
    size = torch.ones(n, dtype=torch.float64)
    merges = []
    for _ in range(n - 1):
        u, v = divmod(int(torch.argmin(dd)), n)
        u, v = min(u, v), max(u, v)
        row = (size[u] * dd[u] + size[v] * dd[v]) / (size[u] + size[v])
        dd[u], dd[:, u] = row, row
        dd[u, u] = float("inf")
        dd[v, :], dd[:, v] = float("inf"), float("inf")
        size[u] += size[v]
        merges.append((u, v))
    return merges


def cut(merges: list[tuple[int, int]], n: int, k: int) -> tuple[int, ...]:
    """Cluster ids (0..k-1, numbered by first member) after the first n-k merges."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for u, v in merges[: n - k]:
        parent[root(v)] = root(u)
    ids: dict[int, int] = {}
    return tuple(ids.setdefault(root(i), len(ids)) for i in range(n))


def _layer_merges(conv: nn.Conv2d, rank: int, n_iter: int, seed: int) -> list[tuple[int, int]]:
    from ..tensor.filter_cp import filter_cp, filter_distances, max_filter_rank

    w = conv.weight.detach().to(torch.float64)
    cp = filter_cp(w, min(rank, max_filter_rank(w.shape[1:])), n_iter=n_iter, seed=seed)
    return merge_sequence(filter_distances(cp, (1.0, 0.0, 0.0)))


def _plan(base: CompressionPlan, mods: dict, merges: dict, frac: float, n_iter: int) -> CompressionPlan:
    """``base`` (filtercp specs) with each decomposed layer's clusters at fraction ``frac``."""
    layers = []
    for s in base.layers:
        if not s.compressed:
            layers.append(s)
            continue
        mod = mods[s.name]
        t = mod.out_channels
        k = min(t, max(1, math.ceil(frac * t)))
        clusters = cut(merges[s.name], t, k)
        opts = {"clusters": clusters, "n_iter": n_iter}
        p, m = FilterCPConv2d.cost(mod, s.rank, s.in_shape[1:], s.out_shape[1:], **opts)
        batch = s.in_shape[0] if s.in_shape else 1
        layers.append(replace(s, options=opts, params_after=p, macs_after=m * batch,
                              reason=f"coupled CP: {k} clusters of {t} filters share the channel factor"))
    return base.with_layers(tuple(layers))


def ccpd(model: nn.Module, example_inputs: Any, *, rank: int = 2, clusters: float | None = None,
         target_macs: float | None = None, train_loader: Any = None, finetune_steps: int = 0,
         finetune_lr: float = 0.01, distill: bool = True, bn_steps: int | None = None,
         n_iter: int = 300, progress: bool = True, seed: int = 0) -> NortonResult:
    """Compress a copy of ``model`` (left untouched) by coupled filter-wise CP (module docstring).

    ``rank``: CP rank R per filter; ``clusters``: fraction K/T in (0, 1] of clusters per layer
    (default 0.25 when no ``target_macs``); ``target_macs``: fraction of the dense MACs to keep
    (exclusive with ``clusters``); recovery as in :func:`~tensorslim.methods.norton.norton`.
    ``history["clusters"]`` gives each layer's cluster ids. ValueError for an unreachable target.
    """
    check_common("ccpd", model, rank, target_macs, finetune_steps, train_loader)
    if clusters is not None and target_macs is not None:
        raise ValueError("ccpd: give clusters (a fraction of filters) or target_macs, not both")
    frac = 0.25 if clusters is None and target_macs is None else clusters
    if frac is not None:
        frac = check_number("ccpd: clusters", frac, 0.0, 1.0)
    inputs = one_sample(example_inputs)
    work = copy.deepcopy(model).eval()
    names, why = decomposable(work, inputs, rank)
    if not names:
        raise ValueError(f"ccpd: no Conv2d of the model is cheaper as a filter-wise CP at rank {rank}")
    mods = dict(work.named_modules())
    merges = {n: _layer_merges(mods[n], rank, n_iter, seed)
              for n in tqdm(names, desc="ccpd clustering", disable=not progress)}
    with eval_mode(work):
        base = make_plan(work, "filtercp", inputs, ranks=rank,
                         include=["".join(f"[{c}]" if c in "*?[]" else c for c in n) for n in names])
    base = replace(base, layers=tuple(replace(s, reason=why.get(s.name, s.reason)) for s in base.layers))
    if frac is None:
        frac = _search(base, mods, merges, n_iter, target_macs)
    plan = _plan(base, mods, merges, frac, n_iter)
    plan = replace(plan, goal={"pipeline": "ccpd", "rank": rank, "clusters": frac,
                               "target_macs": target_macs, "coupling": "shared channel factor"})
    history = {"clusters": {s.name: list(s.options["clusters"]) for s in plan.compressed},
               "fraction": frac}
    return finish("ccpd", model, plan, train_loader, finetune_steps, finetune_lr, distill,
                  bn_steps, progress, history)


def _search(base, mods, merges, n_iter, target) -> float:
    """The largest fraction of clusters whose plan fits ``target`` (bisection, 30 steps)."""
    def fits(f: float) -> bool:
        p = _plan(base, mods, merges, f, n_iter)
        return p.macs_after <= target * p.macs_before

    lo = 1e-9
    if not fits(lo):
        p = _plan(base, mods, merges, lo, n_iter)
        raise ValueError(f"ccpd: target_macs={target} is not reachable: one cluster per layer "
                         f"leaves {p.macs_after / p.macs_before:.4f} of the dense MACs")
    if fits(1.0):
        return 1.0
    hi = 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


register_pipeline(Pipeline(
    name="ccpd", run=ccpd,
    summary="CONCATENATION: coupled filter-wise CP, channel factor shared per filter cluster",
    goals=("target_macs", "ranks"), data="train_loader",
    smoke={"rank": 2, "clusters": 0.5, "n_iter": 20, "progress": False},
    from_goal=rank_goal))

"""NORTON (Pham, Zniyed & Nguyen 2024): filter-wise CP decomposition + CPD-similarity pruning.

1. Every kxk conv (k > 1, groups=1) whose filter-wise CP at ``rank`` costs fewer MACs than the
   dense conv is decomposed filter by filter (``FilterCPConv2d``: 1x1 -> depthwise kx1 ->
   depthwise 1xk -> sum over R).
2. Before that, filters are pruned: the filters of each prunable conv get a rank-R CP, the
   distance matrix of principal angles between their factor subspaces is formed and the most
   redundant filters are removed greedily (``_filter_prune``); the BatchNorm and the next
   layer's inputs are sliced to match (plan ``Edit``s, replayed by ``ts.load``). A conv whose
   output meets a residual add (or anything else than one consumer) is kept unpruned, the
   reason in its ``LayerSpec.reason``.
3. Optionally (``refit_steps``) the channel factor of every decomposed layer is refitted by
   least squares so that the layer's output matches the dense conv's on real inputs
   (``_norton_refit``): the filter-wise CP is already near its best WEIGHT error, the output
   error is what a data-aware fit lowers.
4. BatchNorm re-calibration and fine-tuning (``tensorslim.recover``, distilled from the dense
   model).

Pruning amount: ``prune`` = one rate for every prunable conv or ``{conv name: rate}``;
``target_macs`` = the smallest global rate whose planned MACs fit the target (found by
bisection on the exact planned MACs); neither = decomposition only.

    res = norton(model, torch.randn(1, 1, 28, 28), rank=2, target_macs=0.2,
                 train_loader=loader, finetune_steps=100)
    res.model, res.plan.edits, res.history["layers"]["features.10"]
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cost import as_tuple, count
from ..plan import CompressionPlan, Edit
from ..planning import make_plan
from ..recover import RecoverConfig, recover
from ..surgery import apply_edits, compress, layer_errors
from . import _filter_prune as fp
from ._prune_graph import eval_mode, find_chains, trace
from ..configs import check_int
from .registry import Pipeline, register_pipeline

__all__ = ["NortonResult", "norton"]


@dataclass(frozen=True)
class NortonResult:
    """The compressed model, its plan (pruning as ``plan.edits``, decomposed layers as
    ``filtercp`` specs) and the history: ``layers`` (per pruned conv: filters kept, removal
    order, distance statistics), ``rate`` (the global pruning rate, if one), the fine-tune
    record and ``bn_batches``."""

    model: nn.Module
    plan: CompressionPlan
    history: dict[str, Any] = field(default_factory=dict)


def check_number(name: str, v: Any, lo: float, hi: float, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ValueError(f"{name}={v!r} is out of range; accepted: {lo} {'<' if lo_open else '<='} "
                         f"{name} <= {hi}")
    return float(v)


def check_common(who: str, model: Any, rank: Any, target_macs: Any, finetune_steps: Any,
                 train_loader: Any) -> None:
    """Shared validation of the NORTON / CCPD entry arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} expects an nn.Module, got {type(model).__name__}")
    check_int("rank", rank, 1, where=who, hint="(CP rank of each filter)")
    if target_macs is not None:
        check_number(f"{who}: target_macs", target_macs, 0.0, 1.0)
    check_int("finetune_steps", finetune_steps, 0, where=who)
    if finetune_steps and train_loader is None:
        raise ValueError(f"{who}: finetune_steps={finetune_steps} > 0 needs a train_loader")


def one_sample(example_inputs: Any) -> tuple:
    """The example inputs cut to their first sample: plans count MACs per sample."""
    return tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                 for t in as_tuple(example_inputs))


def decomposable(model: nn.Module, inputs: tuple, rank: int) -> tuple[list[str], dict[str, str]]:
    """Conv2d layers worth a filter-wise CP at ``rank`` (groups=1, k > 1, fewer MACs than
    dense) and, for the other Conv2d, why not."""
    from ..layers import FilterCPConv2d

    mods = dict(model.named_modules())
    with eval_mode(model):
        report = count(model, inputs)
    names, why = [], {}
    for lc in report.layers:
        mod = mods[lc.name]
        if type(mod) is not nn.Conv2d:
            continue
        if mod.groups != 1:
            why[lc.name] = f"kept dense: grouped conv (groups={mod.groups})"
        elif math.prod(mod.kernel_size) == 1:
            why[lc.name] = "kept dense: 1x1 conv (filter-wise CP needs a kxk kernel)"
        else:
            r = FilterCPConv2d.valid_rank(mod, rank)
            _, macs = FilterCPConv2d.cost(mod, r, lc.in_shape[1:], lc.out_shape[1:])
            if macs * lc.in_shape[0] >= lc.macs:
                why[lc.name] = (f"kept dense: filter-wise CP at rank {r} costs {macs * lc.in_shape[0]}"
                                f" MACs >= dense {lc.macs}")
            else:
                names.append(lc.name)
    return names, why


def plan_for(model: nn.Module, inputs: tuple, edits: tuple[Edit, ...], rank: int, names: list[str],
             notes: Mapping[str, str], goal: dict) -> tuple[CompressionPlan, nn.Module]:
    """The plan (edits + filtercp specs at ``rank`` for ``names``; totals from the dense
    model) and the pruned, still dense model it was planned on."""
    pruned = apply_edits(copy.deepcopy(model), edits, weights=True)
    with eval_mode(model):
        dense = count(model, inputs)
    with eval_mode(pruned):
        plan = make_plan(pruned, "filtercp", inputs, ranks=rank, include=[_glob(n) for n in names])
    layers = tuple(replace(s, reason=_join(s.reason if s.compressed else "", notes.get(s.name, "")),
                           options={**s.options, "n_iter": goal["n_iter"]} if s.compressed else s.options)
                   for s in plan.layers)
    plan = replace(plan.with_layers(layers), goal=goal, edits=edits)
    return replace(plan, params_before=dense.total_params, macs_before=dense.total_macs), pruned


def _glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def finish(who: str, model: nn.Module, plan: CompressionPlan, train_loader: Any,
           finetune_steps: int, finetune_lr: float, distill: bool, bn_steps: Any,
           progress: bool, history: dict, refit_steps: int = 0) -> NortonResult:
    """Build the compressed model from ``plan`` (edits replayed, layers decomposed), refit
    the channel factors on ``refit_steps`` batches (then no BatchNorm re-calibration unless
    ``bn_steps`` asks for it, as ``tensorslim.recover`` does after its refit) and recover."""
    from ..reconstruct import _batches
    from ._norton_refit import refit_channel_factors

    student = compress(copy.deepcopy(model), plan, progress=progress)
    plan = plan.with_errors(layer_errors(student, plan))
    history = dict(history)
    if refit_steps and train_loader is not None:
        keeps = {e.target: e.args["keep"] for e in plan.edits if e.op == fp.OP}
        history["refit"] = refit_channel_factors(student, model, _batches(train_loader, refit_steps),
                                                 keeps=keeps, progress=progress)
        bn_steps = 0 if bn_steps is None else bn_steps
    config = RecoverConfig(bn_steps=bn_steps if train_loader is not None else 0,
                           finetune_steps=finetune_steps, lr=finetune_lr, distill=distill)
    res = recover(student, model, config, train_loader=train_loader, progress=progress)
    history |= {k: res.history[k] for k in ("bn_batches",) if k in res.history}
    history |= res.history.get("finetune", {})
    return NortonResult(res.model, plan, history)


def _rates(prune: Any, chains: list, skipped: Mapping[str, str]) -> dict[str, float]:
    names = {ch.conv for ch in chains}
    if prune is None:
        return {n: 0.0 for n in names}
    if isinstance(prune, Mapping):
        bad = sorted(k for k in prune if k not in names)
        if bad:
            why = "; ".join(f"{k}: {skipped[k]}" for k in bad if k in skipped)
            raise ValueError(f"norton: prune names {bad} are not prunable convs"
                             f"{' (' + why + ')' if why else ''}; prunable: {sorted(names)}")
        return {n: check_number(f"norton: prune[{n!r}]", prune.get(n, 0.0), 0.0, 1.0, False)
                for n in names}
    rate = check_number("norton: prune", prune, 0.0, 1.0, False)
    return {n: rate for n in names}


def _keep_count(channels: int, rate: float | Fraction) -> int:
    return max(1, channels - math.floor(rate * channels))


def _edits(chains: list, scores: Mapping[str, tuple[list[int], dict]], keeps: Mapping[str, int]
           ) -> tuple[Edit, ...]:
    """One ``prune_filters`` edit per conv that loses filters: kept indices, the removed ones
    in removal order, the distance statistics."""
    out = []
    for ch in chains:
        keep = keeps[ch.conv]
        if keep >= ch.channels:
            continue
        order, stats = scores[ch.conv]
        extra = {**stats, "removed_in_order": tuple(int(i) for i in order[: ch.channels - keep])}
        out.append(fp.prune_edit(ch, fp.kept(order, ch.channels, keep), extra))
    return tuple(out)


def _search(model, inputs, chains, scores, rank, names, notes, goal, target, progress):
    """The smallest global rate whose plan fits ``target`` x dense MACs (bisection)."""
    cands = sorted({Fraction(p, ch.channels) for ch in chains for p in range(ch.channels)}) or [Fraction(0)]
    cache: dict[int, tuple] = {}
    bar = tqdm(desc="norton rate search", total=max(2, math.ceil(math.log2(len(cands))) + 2),
               disable=not progress)

    def at(i: int) -> tuple:
        if i not in cache:
            keeps = {ch.conv: _keep_count(ch.channels, cands[i]) for ch in chains}
            cache[i] = plan_for(model, inputs, _edits(chains, scores, keeps), rank, names, notes, goal)
            bar.update(1)
        return cache[i]

    lo, hi = 0, len(cands) - 1
    try:
        plan = at(hi)[0]
        if plan.macs_after > target * plan.macs_before:
            raise ValueError(f"norton: target_macs={target} is not reachable: rank {rank} with one "
                             f"filter kept per prunable conv leaves "
                             f"{plan.macs_after / plan.macs_before:.4f} of the dense MACs")
        while lo < hi:
            mid = (lo + hi) // 2
            p = at(mid)[0]
            if p.macs_after <= target * p.macs_before:
                hi = mid
            else:
                lo = mid + 1
    finally:
        bar.close()
    return float(cands[lo]), at(lo)[0]


def norton(model: nn.Module, example_inputs: Any, *, rank: int = 2, prune: Any = None,
           target_macs: float | None = None, train_loader: Any = None, finetune_steps: int = 0,
           finetune_lr: float = 0.01, distill: bool = True, bn_steps: int | None = None,
           weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3), n_iter: int = 300,
           refit_steps: int = 0, progress: bool = True, seed: int = 0) -> NortonResult:
    """Compress a copy of ``model`` (left untouched) by NORTON (see the module docstring).

    ``rank``: CP rank R of every filter (clipped per layer to a filter's generic rank);
    ``prune``: a pruning rate in [0, 1] for every prunable conv, or ``{conv name: rate}``;
    ``target_macs``: fraction of the dense MACs to keep (exclusive with ``prune``);
    ``weights``: (alpha, beta, gamma) of the distance over the channel / height / width
    factors; ``n_iter``: CP-ALS sweeps; ``refit_steps``: batches of ``train_loader`` on which
    every decomposed layer's channel factor is refitted to the dense layer's output
    (``_norton_refit``; BatchNorm re-calibration then defaults to 0 batches); then
    ``bn_steps`` BatchNorm re-calibration batches and
    ``finetune_steps`` fine-tune steps (lr ``finetune_lr``, distilled from the dense model
    when ``distill``) on ``train_loader``. Returns :class:`NortonResult`.
    ValueError / TypeError for bad arguments or an unreachable ``target_macs``.
    """
    check_common("norton", model, rank, target_macs, finetune_steps, train_loader)
    check_int("refit_steps", refit_steps, 0, where="norton")
    if refit_steps and train_loader is None:
        raise ValueError(f"norton: refit_steps={refit_steps} > 0 needs a train_loader")
    if prune is not None and target_macs is not None:
        raise ValueError("norton: give prune (per-layer rates) or target_macs, not both")
    inputs = one_sample(example_inputs)
    work = copy.deepcopy(model).eval()
    chains, skipped = find_chains(trace(work, inputs), set())
    names, why = decomposable(work, inputs, rank)
    if not names:
        raise ValueError(f"norton: no Conv2d of the model is cheaper as a filter-wise CP at rank "
                         f"{rank} ({'; '.join(f'{k}: {v}' for k, v in list(why.items())[:3])})")
    rates = _rates(prune, chains, skipped)
    mods = dict(work.named_modules())
    todo = chains if target_macs is not None else [ch for ch in chains if rates[ch.conv] > 0]
    scores = {ch.conv: fp.score_conv(mods[ch.conv], rank, weights, n_iter, seed)
              for ch in tqdm(todo, desc="norton scoring", disable=not progress)}
    notes = {n: f"not pruned: {r}" for n, r in skipped.items()}
    for n, r in why.items():
        notes[n] = _join(r, notes.get(n, ""))
    goal = {"pipeline": "norton", "rank": rank, "prune": prune, "target_macs": target_macs,
            "weights": tuple(float(w) for w in weights), "n_iter": n_iter,
            "refit_steps": refit_steps}
    if target_macs is not None:
        rate, plan = _search(work, inputs, chains, scores, rank, names, notes, goal, target_macs,
                             progress)
        goal["rate"] = rate
        plan = replace(plan, goal=goal)
    else:
        rate = None
        keeps = {ch.conv: _keep_count(ch.channels, rates[ch.conv]) for ch in chains}
        plan, _ = plan_for(work, inputs, _edits(chains, scores, keeps), rank, names, notes, goal)
    layers = {e.target: dict(e.args) for e in plan.edits}
    return finish("norton", model, plan, train_loader, finetune_steps, finetune_lr, distill,
                  bn_steps, progress, {"layers": layers, "rate": rate}, refit_steps)


def rank_goal(goal: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI goal -> keywords of norton / ccpd: ``--ranks N`` is the CP rank of every filter."""
    out = dict(goal)
    if "ranks" in out:
        out["rank"] = int(out.pop("ranks"))
    return out


register_pipeline(Pipeline(
    name="norton", run=norton,
    summary="NORTON: filter-wise CP of every kxk conv + CPD-similarity filter pruning, fine-tune",
    goals=("target_macs", "ranks"), data="train_loader",
    smoke={"rank": 2, "prune": 0.25, "n_iter": 20, "progress": False},
    from_goal=rank_goal))

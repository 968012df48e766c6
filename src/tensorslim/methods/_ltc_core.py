"""LTC's C-step over a model (per-layer candidate pricing, spectra, the rank choice for a
price ``lam`` or a cost target) and its resumable state folder.

Pricing: each layer's candidate costs come from the planner's pricing
(:func:`tensorslim.planning.candidates.layer_cost`, the factorized layer class's ``cost``).
An SVD layer is priced at every rank 1..min(T, S); a Tucker-2 conv at every pair
(r_in, r_out) up to the ranks of its channel unfoldings. A Tucker-2 layer's cost is bilinear
in (r_in, r_out) (two 1x1 convs and a core), so a large grid is filled from four priced
pairs and checked against the priced corners (a cost model that is not bilinear is priced
pair by pair). Costs are divided by the dense model's total, so ``lam`` prices a fraction
of the whole model.

Two choices shape a Tucker-2 layer's candidates (``LTCOptions.pairs`` / ``rank_error``):
``pairs="proportional"`` keeps only the one-shot planner's pairs (``r_in / S = r_out / T``,
:func:`tensorslim.planning.candidates.rank_space`; the others are priced as dense, which
the rank choice never takes over the dense layer); ``rank_error="bound"`` chooses the rank
on the truncated-HOSVD bound ``e_in(r_in) + e_out(r_out)`` (the planner's error proxy, an
upper bound of the exact error) instead of the exact error of the projection. Theta is the
projection at the chosen rank either way. The exact error of a flat channel spectrum falls
about linearly with the cost (``1 - r_in r_out / (R_in R_out)`` against a cost dominated by
``r_in r_out``), so a price decides between layers all or nothing; the bound falls linearly
in each rank while the cost grows with their product (convex in the cost), which spreads
the cut.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..planning.candidates import PlannedLayer, layer_cost, objective_index, rank_space
from ..rank.lc import (bisect_lam, fill_budget, lc_rank, lc_rank_pair, matrix_errors,
                       tucker2_bound_errors, tucker2_errors, tucker2_spectrum)

PAIRS = ("all", "proportional")
RANK_ERRORS = ("exact", "bound")

_GRID_DIRECT = 64  # price every pair of grids up to this size (larger: bilinear fill, checked)


@dataclass
class LCLayer:
    """A layer LTC compresses: its planned layer, candidate costs (model fractions) and the
    dense cost."""

    planned: PlannedLayer
    cost: torch.Tensor  # (R,) for svd, (R_in, R_out) for tucker
    dense_cost: float
    bound: bool = False  # Tucker-2 rank choice on the HOSVD bound (rank_error="bound")

    @property
    def name(self) -> str:
        return self.planned.name

    @property
    def tucker(self) -> bool:
        return self.planned.method == "tucker"


def _full_ranks(layer: PlannedLayer) -> tuple[int, ...]:
    w = layer.module.weight
    t, s = w.shape[0], w.shape[1]
    if layer.method == "svd":
        return (min(t, w[0].numel()),)
    k = w[0, 0].numel()
    return (min(s, t * k), min(t, s * k))


def price(layer: PlannedLayer, objective: str, total: float, pairs: str = "all",
          rank_error: str = "exact") -> LCLayer:
    """The candidate cost array of ``layer`` in units of ``total`` (the dense model's cost);
    ``pairs`` / ``rank_error``: see the module doc."""
    out = _price(layer, objective, total)
    if not out.tucker:
        return out
    if pairs == "proportional":
        keep = torch.zeros_like(out.cost, dtype=torch.bool)
        for a, b in rank_space(layer):
            if a <= keep.shape[0] and b <= keep.shape[1]:
                keep[a - 1, b - 1] = True
        out.cost = torch.where(keep, out.cost, out.cost.new_full((), out.dense_cost))
    out.bound = rank_error == "bound"
    return out


def _price(layer: PlannedLayer, objective: str, total: float) -> LCLayer:
    obj = objective_index(objective)
    full = _full_ranks(layer)
    dense = float((layer.params, layer.macs)[obj]) / total
    if len(full) == 1:
        cost = torch.tensor([layer_cost(layer, r)[obj] for r in range(1, full[0] + 1)],
                            dtype=torch.float64)
        return LCLayer(layer, cost / total, dense)
    ri, ro = full
    if ri * ro <= _GRID_DIRECT or ri < 2 or ro < 2:
        cost = torch.tensor([[layer_cost(layer, (a, b))[obj] for b in range(1, ro + 1)]
                             for a in range(1, ri + 1)], dtype=torch.float64)
        return LCLayer(layer, cost / total, dense)
    c = {p: float(layer_cost(layer, p)[obj]) for p in ((1, 1), (2, 1), (1, 2), (2, 2))}
    d = c[2, 2] - c[2, 1] - c[1, 2] + c[1, 1]
    a, b = c[2, 1] - c[1, 1] - d, c[1, 2] - c[1, 1] - d
    base = c[1, 1] - a - b - d
    r_in = torch.arange(1, ri + 1, dtype=torch.float64)[:, None]
    r_out = torch.arange(1, ro + 1, dtype=torch.float64)[None, :]
    cost = base + a * r_in + b * r_out + d * r_in * r_out
    for p in ((ri, ro), (ri, 1), (1, ro), (ri // 2, ro // 3 + 1)):
        if float(cost[p[0] - 1, p[1] - 1]) != layer_cost(layer, p)[obj]:  # not bilinear
            cost = torch.tensor([[layer_cost(layer, (x, y))[obj] for y in range(1, ro + 1)]
                                 for x in range(1, ri + 1)], dtype=torch.float64)
            break
    return LCLayer(layer, cost / total, dense)


@dataclass
class Spectrum:
    """One layer's decomposition of the C-step's input ``v = W - phi / mu``: the squared
    error of every candidate and what projecting needs."""

    err: torch.Tensor
    factors: Any  # (U, S, Vh) for svd, a Tucker2Spectrum for tucker


def spectrum(layer: LCLayer, v: torch.Tensor) -> Spectrum:
    if layer.tucker:
        spec = tucker2_spectrum(v)
        errors = tucker2_bound_errors if layer.bound else tucker2_errors
        return Spectrum(errors(spec.energy, spec.norm2), spec)
    u, s, vh = torch.linalg.svd(v.detach().double().reshape(v.shape[0], -1), full_matrices=False)
    return Spectrum(matrix_errors(s), (u, s, vh))


def choose(layer: LCLayer, spec: Spectrum, lam: float, mu: float) -> Any:
    """The C-step's rank for ``layer`` (int, pair, or None = dense)."""
    pick = lc_rank_pair if layer.tucker else lc_rank
    return pick(spec.err, layer.cost, lam, mu, dense_cost=layer.dense_cost)


def rank_cost(layer: LCLayer, rank: Any) -> float:
    """The cost (model fraction) of ``layer`` at ``rank`` (None: dense)."""
    if rank is None:
        return layer.dense_cost
    return float(layer.cost[rank[0] - 1, rank[1] - 1] if layer.tucker else layer.cost[rank - 1])


def project(layer: LCLayer, spec: Spectrum, v: torch.Tensor, rank: Any) -> torch.Tensor:
    """Theta: ``v`` projected onto ``rank`` (``v`` itself when dense), in ``v``'s dtype."""
    if rank is None:
        return v.detach().clone()
    if layer.tucker:
        return spec.factors.project(v.detach(), rank)
    u, s, vh = spec.factors
    theta = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return theta.reshape(v.shape).to(v.dtype)


def budget(target_macs: float | None, target_params: float | None, objective: str,
           layers: list[LCLayer]) -> float | None:
    """The layers' share of the target (model fraction), or None without a target (``lam``).
    ValueError when the smallest ranks do not fit."""
    target = target_macs if target_macs is not None else target_params
    if target is None:
        return None
    fixed = 1.0 - sum(l.dense_cost for l in layers)  # layers kept dense and uncounted ops
    lowest = fixed + sum(float(l.cost.min()) for l in layers)
    name = "target_macs" if target_macs is not None else "target_params"
    if lowest > target:
        raise ValueError(f"ltc: {name}={target} is unreachable: the smallest Tucker-2/SVD ranks "
                         f"keep {lowest:.4f} of the dense model's {objective}")
    return target - fixed


def lam_for_target(layers: list[LCLayer], specs: list[Spectrum], mu: float, budget: float
                   ) -> float:
    """The smallest price ``lam`` whose C-step keeps the layers' total cost (model fraction)
    within ``budget``: bisection in log scale, the C-step's total cost being non-increasing
    in ``lam``. ValueError when the smallest ranks do not fit."""
    def total(lam: float) -> float:
        return sum(rank_cost(l, choose(l, s, lam, mu)) for l, s in zip(layers, specs))

    steps = []
    for l in layers:
        lowest = float(l.cost.min())
        above = torch.cat([l.cost.reshape(-1), l.cost.new_tensor([l.dense_cost])]) - lowest
        steps.append(float(above[above > 0].min()) if bool((above > 0).any()) else 1.0)
    norm = max(float(s.err.max()) for s in specs) + 1e-30
    hi = mu * norm / min(steps) * 2  # every layer at its cheapest rank from here on
    lowest = sum(float(l.cost.min()) for l in layers)
    if lowest > budget * (1 + 1e-12):
        raise ValueError(f"unreachable: the smallest ranks keep {lowest:.4f} of the layers' budget "
                         f"{budget:.4f}")
    return bisect_lam(total, budget, hi)[0]


def c_step(layers: list[LCLayer], model: nn.Module, phis: dict[str, torch.Tensor], mu: float,
           lam: float | None, budget: float | None, weights: dict[str, float] | None = None
           ) -> tuple[dict, dict, float]:
    """One C-step: per layer the rank and Theta for ``v = W - phi / mu``; ``lam`` given, or
    found for the cost ``budget`` (model fraction of the compressible layers). ``weights``:
    the per-layer scale ``s_k`` of the squared error in the rank choice (``_ltc_price``; None:
    1), which leaves Theta at a given rank unchanged. Returns (ranks, thetas, lam)."""
    vs = {}
    for l in layers:
        w = model.get_submodule(l.name).weight.detach()
        vs[l.name] = w - phis[l.name].to(w) / mu if l.name in phis else w
    specs = [spectrum(l, vs[l.name]) for l in layers]
    if weights is not None:  # the rank choice (and the budget fill) sees s_k * error
        specs = [Spectrum(s.err * float(weights[l.name]), s.factors) for l, s in zip(layers, specs)]
    target = lam is None
    if target:
        lam = lam_for_target(layers, specs, mu, budget)
    chosen = [choose(l, s, lam, mu) for l, s in zip(layers, specs)]
    if target:  # spend what the price leaves of the budget
        flat = [None if r is None else _flat(l, r) for l, r in zip(layers, chosen)]
        flat = fill_budget([s.err.reshape(-1) for s in specs], [l.cost.reshape(-1) for l in layers],
                           [l.dense_cost for l in layers], flat, budget)
        chosen = [None if i is None else _unflat(l, i) for l, i in zip(layers, flat)]
    ranks, thetas = {}, {}
    for l, s, r in zip(layers, specs, chosen):
        ranks[l.name] = r
        thetas[l.name] = project(l, s, vs[l.name], r)
    return ranks, thetas, lam


def record(k: int, run: Any, lam: float, ranks: dict, thetas: dict, loss: float | None,
            wstep_s: float, cstep_s: float) -> dict[str, Any]:
    """The history record of LC step ``k`` (see ``LTCResult``) of ``run`` (an ``_LTCRun``)."""
    opts, layers, work = run.opts, run.layers, run.work
    sq = norm = 0.0
    for l in layers:
        w = work.get_submodule(l.name).weight.detach().double()
        sq += float(((w - thetas[l.name].to(w)) ** 2).sum())
        norm += float((w ** 2).sum())
    cost = 1.0 - sum(l.dense_cost for l in layers) + sum(rank_cost(l, ranks[l.name]) for l in layers)
    rec = {"step": k, "mu": opts.mu(k), "lam": lam, "ranks": dict(ranks), "cost_ratio": cost,
           "cost": cost * run.total, "loss": loss, "dist": sq ** 0.5,
           "rel_dist": (sq / norm) ** 0.5 if norm else 0.0,
           "wstep_s": round(wstep_s, 4), "cstep_s": round(cstep_s, 4)}
    return json.loads(json.dumps(rec))  # JSON-normal (pairs as lists), as a resumed run has it


def _flat(layer: LCLayer, rank: Any) -> int:
    return (rank[0] - 1) * layer.cost.shape[1] + rank[1] - 1 if layer.tucker else rank - 1


def _unflat(layer: LCLayer, i: int) -> Any:
    return (i // layer.cost.shape[1] + 1, i % layer.cost.shape[1] + 1) if layer.tucker else i + 1


def _group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share(ranks: dict, thetas: dict, lam: float) -> tuple[dict, dict, float]:
    """Rank 0's C-step result on every rank of a process group (as given outside one).
    The ranks agree on W, but a rank choice on a tie could differ between their LAPACK
    calls, and then so would the compressed architectures."""
    if not _group():
        return ranks, thetas, lam
    box = [ranks, lam]
    dist.broadcast_object_list(box, src=0)
    for name in sorted(thetas):
        dist.broadcast(thetas[name], src=0)
    return box[0], thetas, box[1]


def barrier() -> None:
    if _group():
        dist.barrier()


class Penalty:
    """The W-step's penalty gradient for one weight: ``mu * (W - Theta) - phi``, the gradient
    of ``mu/2 ||W - Theta - phi/mu||^2``, added to the loss gradient by a tensor hook (the
    training loop is :func:`tensorslim.train.train`, which takes no extra loss term). Under
    DDP the hook runs on every rank before the all-reduce, on identical weights, so the
    averaged gradient carries the penalty once."""

    def __init__(self, weight: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor | None,
                 mu: float) -> None:
        self.weight, self.mu = weight, mu
        self.shift = theta + phi / mu if phi is not None else theta  # W's pull point

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.shift.device != grad.device or self.shift.dtype != grad.dtype:
            self.shift = self.shift.to(grad)
        return grad + self.mu * (self.weight.detach() - self.shift)


# ---- the resumable state: state_dir/state.json + state_dir/step_{k}.safetensors ----------

STATE, VERSION = "state.json", 1


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_main() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def save_state(folder: Path | None, k: int, config: dict, fp: str, history: list,
               model: nn.Module, thetas: dict, phis: dict) -> None:
    """Write LC step ``k`` (weights, Theta, phi, history) atomically: the tensors file first,
    then ``state.json`` naming it, then the previous step's file is removed."""
    if folder is None or not _is_main():
        return
    from safetensors.torch import save_file

    from ..files import atomic_write, write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": t for n, t in model.state_dict().items()}
    tensors |= {f"theta.{n}": t for n, t in thetas.items()}
    tensors |= {f"phi.{n}": t for n, t in phis.items()}
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()}
    name = f"step_{k}.safetensors"
    atomic_write(folder / name, lambda tmp: save_file(tensors, tmp))
    state = {"version": VERSION, "step": k, "tensors": name, "config": config,
             "fingerprint": fp, "history": history}
    write_text_atomic(folder / STATE, json.dumps(state, indent=2))
    for old in folder.glob("step_*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(folder: Path | None, config: dict, fp: str, model: nn.Module
               ) -> tuple[int, list, dict, dict] | None:
    """(step, history, thetas, phis) of the saved run, its weights loaded into ``model``; None
    without a saved run. ValueError for a run of other settings or another dense model."""
    path = None if folder is None else folder / STATE
    if path is None or not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: unknown ltc state version {state.get('version')!r}; this "
                         f"tensorslim reads version {VERSION}")
    old = state.get("config", {})
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        raise ValueError(f"{path}: the saved run used other settings ("
                         + ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
                         + "); use the same settings to resume, or another state_dir")
    if state.get("fingerprint") != fp:
        raise ValueError(f"{path}: the saved run started from a different dense model (weights "
                         f"differ); pass the same model to resume, or use another state_dir")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / state["tensors"]))
    model.load_state_dict({n[6:]: t for n, t in tensors.items() if n.startswith("model.")})
    thetas = {n[6:]: t for n, t in tensors.items() if n.startswith("theta.")}
    phis = {n[4:]: t for n, t in tensors.items() if n.startswith("phi.")}
    return int(state["step"]), list(state["history"]), thetas, phis

"""LTC: learn the Tucker-2 ranks of every layer jointly with the weights (Hao, Li, Wu,
DCC 2022), by the learning-compression (LC) scheme of Idelbayev & Carreira-Perpinan (CVPR 2020).

    min_W L(W) + lam C(r)   s.t. every W_k has Tucker-2 ranks r_k = (r_in, r_out)

is solved with the augmented Lagrangian
``Q = L(W) + lam C(r) + mu/2 sum_k ||W_k - Theta_k - phi_k / mu||^2`` for a growing
``mu = mu0 * mu_growth**k``:

1. start: ``Theta`` = the C-step of the trained weights at ``mu0``, ``phi = 0``;
2. per LC step k: W-step: ``steps_per_lc_step`` SGD steps on ``L(W) + mu/2 ||W - Theta - phi/mu||^2``
   (:func:`tensorslim.train.train`, the penalty's gradient added by a hook on each weight,
   so the DDP path of ``train`` is used unchanged under ``torchrun``; by default L is
   distilled from the dense model as the fine-tuning of one-shot methods is); C-step: per layer,
   the rank minimising ``lam C(r) + mu/2 ||v - Pi_r(v)||^2``, ``v = W - phi/mu``
   (:mod:`tensorslim.rank.lc`: Tucker-2 HOSVD of the two channel unfoldings for convs with a
   spatial kernel, SVD for Linear and 1x1 convs; by default a Tucker-2 rank is chosen among the
   one-shot planner's proportional pairs on the truncated-HOSVD error bound, ``pairs`` /
   ``rank_error``, :mod:`tensorslim.methods._ltc_core`), ``Theta = Pi_r(v)``, the error of layer k
   weighted by a per-layer scale ``s_k`` set once from the dense model (``price``, default
   ``relative``: ``1 / ||W_k||^2``; :mod:`tensorslim.methods._ltc_price`, which derives it as
   the exact C-step of a per-layer price ``lam / s_k``); then
   ``phi <- phi - mu (W - Theta)`` (``lagrangian=False``: ``phi = 0``, the quadratic penalty);
3. the compressed model is ``Theta`` at the last ranks, through a normal
   :class:`~tensorslim.plan.CompressionPlan` and :func:`tensorslim.compress`, then optional
   recovery (BatchNorm re-calibration, fine-tuning distilled from the dense model).

``C(r)`` is the factorized layer's MACs (or params) as the planner prices it, as a fraction
of the dense model's total. With ``target_macs`` / ``target_params`` instead of ``lam``, each
C-step finds ``lam`` by bisection (log scale) so that the model's cost at the chosen ranks
is at most the target on the current weights and ``mu`` (the C-step depends on lam/mu only),
then spends what that price leaves of the budget greedily (:func:`tensorslim.rank.lc.fill_budget`:
a price only reaches each layer's lower convex hull of (cost, error), and a flat spectrum
jumps from dense to rank 1): the ranks of every step, the last included, meet the target.
``history[k]["lam"]`` is the bisected price.

MACs are counted per sample (the first item of ``example_inputs``'s batch), so
``plan.macs_after`` is the compressed model's count for one input.

    res = ltc(model, x, train_loader=train, target_macs=0.25, lc_steps=4, steps_per_lc_step=25)
    res.model, res.plan, res.history

Under ``torchrun`` the run joins one process group for all its steps (or uses the caller's):
every W-step trains through DDP, every C-step's ranks and Theta are rank 0's (broadcast, so
a tie decided differently by another rank's LAPACK cannot split the ranks), and only rank 0
writes the state folder.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..configs import check_int, check_number, resolve, to_dict
from ..cost import as_tuple, count
from ..ddp import setup_distributed, teardown
from ..plan import CompressionPlan
from ..planning import build_spec, collect_layers
from . import _ltc_core as core
from ._ltc_price import PRICES, layer_weights
from ._musco_state import _StageLoader
from .registry import Pipeline, register_pipeline


@dataclass(frozen=True)
class LTCOptions:
    """The settings of an LTC run (frozen, validated, JSON round trip).

    Exactly one goal: ``lam`` (the price of cost, per unit of the dense model's total),
    ``target_macs`` or ``target_params`` (a fraction in (0, 1] of the dense model's).
    ``objective``: the cost C priced by ``lam`` (``macs`` or ``params``; default: the
    target's, ``macs`` with ``lam``). ``mu0``, ``mu_growth``: the penalty schedule
    ``mu_k = mu0 * mu_growth**k``. ``lc_steps``: LC steps (W-step + C-step). ``lr``,
    ``lr_decay``, ``momentum``, ``weight_decay``: SGD of the W-steps (constant rate within a
    step, ``lr * lr_decay**k`` in step k); ``wstep_distill``: the W-steps' loss L is
    ``(1 - distill_alpha) CE + distill_alpha KD`` (KD at temperature ``distill_T`` from the
    dense model, the fine-tuning loss of the other methods) instead of CE alone.
    ``lagrangian``: keep the multipliers phi (augmented Lagrangian) or not (quadratic
    penalty). Then ``bn_steps`` BatchNorm re-calibration batches (None: recover's default)
    and ``finetune_steps`` fine-tuning steps (``finetune_lr``, distilled from the dense model
    with the same ``distill_alpha`` / ``distill_T`` when ``distill``). ``include`` /
    ``exclude``: glob patterns of the layers to compress / keep dense. ``price``: the
    per-layer scale of the squared error in the C-step's rank choice (``weight``,
    ``relative``, ``fisher``, ``measured``: :mod:`tensorslim.methods._ltc_price`; the last
    two from ``price_batches`` training batches of the dense model). ``pairs`` (``proportional``:
    the one-shot planner's pairs ``r_in / S = r_out / T``; ``all``) and ``rank_error``
    (``bound``: the truncated-HOSVD bound ``e_in + e_out``; ``exact``: the projection's
    error): the Tucker-2 candidates and the error the rank choice sees
    (:mod:`tensorslim.methods._ltc_core`)."""

    lam: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    objective: str | None = None
    mu0: float = 1e-2
    mu_growth: float = 1.7
    lc_steps: int = 10
    steps_per_lc_step: int = 100
    lr: float = 0.01
    lr_decay: float = 0.98
    momentum: float = 0.9
    weight_decay: float = 0.0
    wstep_distill: bool = True
    distill_alpha: float = 0.5
    distill_T: float = 4.0
    lagrangian: bool = True
    bn_steps: int | None = None
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    distill: bool = True
    seed: int = 0
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    price: str = "relative"
    price_batches: int = 4
    pairs: str = "proportional"
    rank_error: str = "bound"

    def __post_init__(self) -> None:
        goals = [g for g in ("lam", "target_macs", "target_params") if getattr(self, g) is not None]
        if len(goals) != 1:
            raise ValueError(f"ltc: give exactly one of lam, target_macs, target_params; got "
                             f"{', '.join(goals) or 'none'}")
        w = "ltc"
        if self.lam is not None:
            check_number("lam", self.lam, lambda v: 0 <= v < math.inf, "a number >= 0", where=w)
        for g in ("target_macs", "target_params"):
            if getattr(self, g) is not None:
                check_number(g, getattr(self, g), lambda v: 0 < v <= 1, "a number in (0, 1]", where=w)
        implied = {"target_macs": "macs", "target_params": "params"}.get(goals[0])
        if self.objective not in (None, "macs", "params") or implied and self.objective not in (None, implied):
            raise ValueError(f"ltc: objective must be 'macs' or 'params'{f' (as {goals[0]})' if implied else ''}, "
                             f"got {self.objective!r}")
        object.__setattr__(self, "objective", self.objective or implied or "macs")
        for name, ok, text in (("mu0", lambda v: 0 < v < math.inf, "a number > 0"),
                               ("mu_growth", lambda v: 1 <= v < math.inf, "a number >= 1"),
                               ("lr", lambda v: 0 < v < math.inf, "a number > 0"),
                               ("finetune_lr", lambda v: 0 < v < math.inf, "a number > 0"),
                               ("lr_decay", lambda v: 0 < v <= 1, "a number in (0, 1]"),
                               ("distill_alpha", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                               ("distill_T", lambda v: 0 < v < math.inf, "a number > 0"),
                               ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                               ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")):
            check_number(name, getattr(self, name), ok, text, where=w)
        check_int("lc_steps", self.lc_steps, 1, where=w)
        check_int("steps_per_lc_step", self.steps_per_lc_step, 0, where=w)
        check_int("finetune_steps", self.finetune_steps, 0, where=w)
        check_int("bn_steps", self.bn_steps, 0, where=w, none_ok=True)
        check_int("seed", self.seed, 0, where=w)
        check_int("price_batches", self.price_batches, 1, where=w)
        for name, known in (("pairs", core.PAIRS), ("rank_error", core.RANK_ERRORS)):
            if getattr(self, name) not in known:
                raise ValueError(f"ltc: {name} must be one of {', '.join(known)}, "
                                 f"got {getattr(self, name)!r}")
        if self.price not in PRICES:
            raise ValueError(f"ltc: price must be one of {', '.join(PRICES)}, got {self.price!r}")
        for name in ("lagrangian", "distill", "wstep_distill"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ltc: {name} must be True or False, got {getattr(self, name)!r}")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if v is not None:
                v = (v,) if isinstance(v, str) else tuple(v)
                if not all(isinstance(p, str) for p in v):
                    raise TypeError(f"ltc: {name} must be a glob pattern or a list of them, got {v!r}")
                object.__setattr__(self, name, v)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def mu(self, k: int) -> float:
        """The penalty weight of LC step ``k`` (0: the initial C-step)."""
        return self.mu0 * self.mu_growth ** max(k - 1, 0)


@dataclass(frozen=True)
class LTCResult:
    """The compressed model (eval mode), its plan, one record per LC step k = 1..lc_steps
    (``step``, ``mu``, ``lam``, ``ranks`` per layer (None: dense), ``cost_ratio`` and
    ``cost`` of the model at those ranks, train ``loss`` of the W-step, ``dist`` =
    ||W - Theta|| and ``rel_dist`` = ||W - Theta|| / ||W|| after the C-step, ``wstep_s`` /
    ``cstep_s`` seconds), the same record of the initial C-step on the dense weights
    (``initial``, step 0, no W-step, with the ``price_weights`` s_k of the rank price) and
    the final recovery's record."""

    model: nn.Module
    plan: CompressionPlan
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    initial: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)


def ltc(model: nn.Module, example_inputs: Any, options: LTCOptions | Mapping[str, Any] | None = None,
        *, train_loader: Any = None, state_dir: str | Path | None = None,
        max_lc_steps_this_call: int | None = None, progress: bool = True,
        **settings: Any) -> LTCResult:
    """Learn the ranks of a copy of ``model`` (left untouched) with LC; see the module doc.

    Args:
        example_inputs: a tensor or tuple; MACs are counted per sample (its first item).
        options / settings: :class:`LTCOptions` (a keyword overrides the field).
        train_loader: labelled batches ``(x, y)`` for the W-steps (and the recovery).
        state_dir: folder of the resumable state (every LC step is written there; a call with
            the same settings and dense model resumes after the last written step).
        max_lc_steps_this_call: stop after this many LC steps (resume later); the result is
            then the compression of the current ranks.
    """
    opts = resolve(LTCOptions, options, settings, "ltc")
    if not isinstance(model, nn.Module):
        raise TypeError(f"ltc expects an nn.Module, got {type(model).__name__}")
    if train_loader is None:
        raise ValueError("ltc needs a train_loader (labelled batches) for its W-steps")
    if example_inputs is None:
        raise ValueError("ltc needs example_inputs (a tensor or tuple) to trace layer shapes")
    if max_lc_steps_this_call is not None:
        check_int("max_lc_steps_this_call", max_lc_steps_this_call, 0, where="ltc")
    env = setup_distributed(None)  # under torchrun: one group for every step (or the caller's)
    try:
        return _run(model, example_inputs, opts, train_loader, state_dir,
                    max_lc_steps_this_call, progress)
    finally:
        teardown(env)  # collects the W-steps' DDP wrappers, then leaves the group it joined


def _run(model: nn.Module, example_inputs: Any, opts: LTCOptions, train_loader: Any,
         state_dir: Any, max_lc_steps_this_call: int | None, progress: bool) -> LTCResult:
    """The LC loop of :func:`ltc` (arguments checked, inside the process group if any)."""
    run = _setup(model, example_inputs, opts, state_dir)
    ranks, thetas, phis, history = _start(run, train_loader, progress)
    ran = 0
    bar = tqdm(range(len(history), opts.lc_steps + 1), desc="ltc", disable=not progress,
               initial=len(history) - 1, total=opts.lc_steps)
    for k in bar:
        if max_lc_steps_this_call is not None and ran >= max_lc_steps_this_call:
            break
        ranks, thetas, phis, rec = _lc_step(k, run, thetas, phis, train_loader, progress)
        history.append(rec)
        core.save_state(run.folder, k, run.config, run.fp, history, run.work, thetas, phis)
        bar.set_postfix_str(f"mu {rec['mu']:.3g} cost {rec['cost_ratio']:.4f} "
                            f"|W-T|/|W| {rec['rel_dist']:.3g}")
        ran += 1
    bar.close()
    return _finish(model, run, ranks, thetas, history, train_loader, progress)


@dataclass
class _LTCRun:
    """What every LC step of one run uses: the settings, the layers with their candidate
    costs, the working copy of the model (its weights W), the cost budget, the state folder."""

    opts: LTCOptions
    report: Any
    layers: list
    kept: list
    total: float
    budget: float | None
    work: nn.Module
    teacher: nn.Module | None  # a frozen copy of the dense model (W-step distillation)
    config: dict
    folder: Path | None
    fp: str
    weights: dict | None = None  # s_k of the C-step's rank price (None: price "weight")


def _setup(model: nn.Module, example_inputs: Any, opts: LTCOptions, state_dir: Any) -> _LTCRun:
    """Count the model per sample, collect and price its layers (Tucker-2 for convs with a
    spatial kernel, SVD for Linear / 1x1 convs; grouped convs stay dense)."""
    x1 = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() else t for t in as_tuple(example_inputs))
    report = count(model, x1)
    goal = {"include": opts.include, "exclude": opts.exclude}
    todo, kept = collect_layers(model, "auto", report, goal)
    kept += [build_spec(l, "kept dense: ltc does not learn ranks of grouped convs")
             for l in todo if getattr(l.module, "groups", 1) != 1]
    todo = [l for l in todo if getattr(l.module, "groups", 1) == 1]
    total = float(report.total_params if opts.objective == "params" else report.total_macs)
    layers = [core.price(l, opts.objective, total, opts.pairs, opts.rank_error) for l in todo]
    config = {**opts.to_dict(), "example_shape": [list(t.shape) for t in x1 if isinstance(t, torch.Tensor)]}
    folder = Path(state_dir) if state_dir is not None else None
    fp = core.fingerprint(model) if folder is not None else ""
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if opts.wstep_distill else None
    budget = core.budget(opts.target_macs, opts.target_params, opts.objective, layers)
    return _LTCRun(opts, report, layers, kept, total, budget, copy.deepcopy(model), teacher,
                   config, folder, fp)


def _start(run: _LTCRun, loader: Any, progress: bool) -> tuple[dict, dict, dict, list]:
    """(ranks, thetas, phis, history) after the price weights and the initial C-step (at
    mu0, phi = 0) or, with a saved run in the state folder, after its last LC step (its
    weights loaded, the price weights from its initial record)."""
    saved = core.load_state(run.folder, run.config, run.fp, run.work)
    core.barrier()  # every rank has looked for a saved run before rank 0 writes one
    opts = run.opts
    if saved is not None:
        k, history, thetas, phis = saved
        run.weights = history[0].get("price_weights")
        if progress:
            print(f"ltc: resuming after LC step {k} from {run.folder}", flush=True)
        ranks = {n: (tuple(r) if isinstance(r, list) else r) for n, r in history[-1]["ranks"].items()}
        return ranks, thetas, phis, history
    t0 = time.perf_counter()
    if opts.price != "weight":
        probe = opts.target_macs or opts.target_params or 0.25
        run.weights = layer_weights(opts.price, run.work, run.layers, loader, opts.price_batches, probe)
    ranks, thetas, lam = core.share(*core.c_step(run.layers, run.work, {}, opts.mu(0), opts.lam,
                                                 run.budget, run.weights))
    phis = {l.name: torch.zeros_like(thetas[l.name]) for l in run.layers} if opts.lagrangian else {}
    history = [core.record(0, run, lam, ranks, thetas, None, 0.0, time.perf_counter() - t0)
               | {"price_weights": run.weights}]
    core.save_state(run.folder, 0, run.config, run.fp, history, run.work, thetas, phis)
    return ranks, thetas, phis, history


def _lc_step(k: int, run: _LTCRun, thetas: dict, phis: dict, loader: Any, progress: bool
             ) -> tuple[dict, dict, dict, dict]:
    """LC step ``k`` >= 1: W-step at mu_k, C-step, multiplier update; its record."""
    opts, mu = run.opts, run.opts.mu(k)
    t0 = time.perf_counter()
    loss = _w_step(k, run, thetas, phis, mu, loader, progress)
    t1 = time.perf_counter()
    ranks, thetas, lam = core.share(*core.c_step(run.layers, run.work, phis, mu, opts.lam, run.budget,
                                                 run.weights))
    t2 = time.perf_counter()
    if opts.lagrangian:
        for l in run.layers:
            w = run.work.get_submodule(l.name).weight.detach()
            phis[l.name] = phis[l.name].to(w) - mu * (w - thetas[l.name].to(w))
    rec = core.record(k, run, lam, ranks, thetas, loss, t1 - t0, t2 - t1)
    return ranks, thetas, phis, rec


def _w_step(k: int, run: _LTCRun, thetas: dict, phis: dict, mu: float, loader: Any,
            progress: bool) -> float | None:
    """``steps_per_lc_step`` SGD steps of :func:`tensorslim.train.train` on L(W) plus the
    penalty (a gradient hook per weight), L distilled from the dense model when
    ``wstep_distill``; the mean training loss L of the step."""
    opts, work = run.opts, run.work
    if opts.steps_per_lc_step == 0:
        return None
    from ..train import train

    hooks = []
    for l in run.layers:
        w = work.get_submodule(l.name).weight
        hook = core.Penalty(w, thetas[l.name].to(w), phis[l.name].to(w) if l.name in phis else None, mu)
        hooks.append(w.register_hook(hook))
    try:
        hist = train(work, _StageLoader(loader, 10_000 * k), steps=opts.steps_per_lc_step,
                     lr=opts.lr * opts.lr_decay ** (k - 1), schedule="constant",
                     momentum=opts.momentum, weight_decay=opts.weight_decay,
                     teacher=run.teacher, distill_alpha=opts.distill_alpha,
                     distill_T=opts.distill_T, seed=opts.seed * 1_000_003 + k,
                     progress=progress, log_every=0)
    finally:
        for h in hooks:
            h.remove()
        if dist.is_available() and dist.is_initialized():
            # train() left its DDP wrapper in a reference cycle (the group is ours, so it did
            # not collect it): free it now, before the next W-step wraps the same weights,
            # rather than leave its reducer's autograd hooks and buckets on them
            gc.collect()
    return float(hist["loss"][-1])


def _finish(dense: nn.Module, run: _LTCRun, ranks: dict, thetas: dict, history: list,
            loader: Any, progress: bool) -> LTCResult:
    """Theta at the learned ranks as a compressed model (plan + compress), then recovery."""
    from ..recover import RecoverConfig, recover
    from ..surgery import compress

    opts, layers, work, report = run.opts, run.layers, run.work, run.report
    last = history[-1]
    why = f"ltc: LC step {last['step']}, lam {last['lam']:.4g}, mu {last['mu']:.4g}"
    specs = list(run.kept)
    for l in layers:
        r = ranks[l.name]
        specs.append(build_spec(l.planned, f"kept dense: the C-step chose the full layer ({why})")
                     if r is None else build_spec(l.planned, r, opts.objective, why))
    order = {lc.name: i for i, lc in enumerate(report.layers)}
    specs.sort(key=lambda s: order[s.name])
    goal = {"ltc": {k: v for k, v in opts.to_dict().items() if k != "seed"},
            "lam": last["lam"], "mu": last["mu"], "objective": opts.objective,
            "price": opts.price, "price_weights": run.weights, "pairs": opts.pairs,
            "rank_error": opts.rank_error}
    goal |= {g: getattr(opts, g) for g in ("target_macs", "target_params") if getattr(opts, g) is not None}
    plan = CompressionPlan(layers=(), method="auto", goal=json.loads(json.dumps(goal)),
                           params_before=report.total_params, params_after=report.total_params,
                           macs_before=report.total_macs, macs_after=report.total_macs)
    plan = CompressionPlan.from_dict(plan.with_layers(tuple(specs)).to_dict())
    errors = {}
    student = copy.deepcopy(work).eval()
    with torch.no_grad():
        for l in layers:
            w = student.get_submodule(l.name).weight
            errors[l.name] = float(torch.linalg.vector_norm(w.double() - thetas[l.name].double())
                                   / torch.linalg.vector_norm(w.double()).clamp_min(1e-30))
            if ranks[l.name] is not None:
                w.copy_(thetas[l.name].to(w))
    plan = plan.with_errors({s.name: errors[s.name] for s in plan.compressed})
    student = compress(student, plan, progress=progress)
    cfg = RecoverConfig(bn_steps=opts.bn_steps, finetune_steps=opts.finetune_steps,
                        lr=opts.finetune_lr, distill=opts.distill, distill_alpha=opts.distill_alpha,
                        distill_T=opts.distill_T, seed=opts.seed)
    res = recover(student, dense, cfg, train_loader=loader, progress=progress)
    return LTCResult(res.model.eval(), plan, tuple(history[1:]), history[0], dict(res.history))


PIPELINE = register_pipeline(Pipeline(
    name="ltc", run=ltc, goals=("lam", "target_macs", "target_params"), data="train_loader",
    summary="LTC: Tucker-2/SVD ranks learned with the weights (learning-compression, augmented Lagrangian)",
    smoke={"lc_steps": 2, "steps_per_lc_step": 2, "target_macs": 0.5, "bn_steps": 2,
           "progress": False}))

"""MUSCO: automated multi-stage compression (Gusak et al., ICCVW 2019).

Repeat { compress, fine-tune }: the first stage decomposes dense layers; later stages decompose
what is still dense and re-compress the factorized layers at smaller ranks (Tucker-2: a Tucker-2
of the core merged into the 1x1 convs; SVD: truncation of the factors' SVD; CP: CP at a smaller
rank of the current kernel), each stage fine-tuned with distillation from the original dense
model. It stops after ``stages`` stages, when a MAC target is met, or when ``stage_ranks``
changes no rank any more (EVBMF ranks stabilised).

With ``state_dir`` every finished stage is written to ``state_dir/stage_{k}/`` (a
:func:`tensorslim.io.save` checkpoint) plus ``state_dir/state.json`` (config, history), and a
later call with the same arguments resumes after the last finished stage; fine-tuning of stage
k is seeded from (seed, k), so an interrupted run ends with the same plan and weights.

    res = musco(model, "tucker", x, train_loader=train, stages=3, finetune_steps_per_stage=200,
                target_macs=0.25, state_dir="runs/musco")
    opts = MuscoOptions(stages=3, finetune_steps_per_stage=200, target_macs=0.25)
    res = musco(model, "tucker", x, opts, train_loader=train)      # the same run
    res.model, res.plan, res.history
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..configs import check_int, check_number, resolve, to_dict
from ..cost import count
from ..planning import build_spec, collect_layers
from ..plan import KEEP, CompressionPlan, LayerSpec
from ..rank.vbmf import DEFAULT_FACTOR
from . import _musco_ranks as R
from ._musco_state import _Run, recover_stage

METHODS = ("tucker", "svd", "cp", "auto")
VBMF_FACTOR = DEFAULT_FACTOR  # MUSCO's weakening of EVBMF ranks (tensorslim.rank.vbmf)


def _check_count(name: str, value: Any, low: int) -> None:
    check_int(name, value, low, where="musco")


def _check_number(name: str, value: Any, ok: Any, accepted: str) -> None:
    check_number(name, value, ok, accepted, where="musco")


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    """None, or glob patterns of layer names as a tuple (one string: one pattern)."""
    if value is None:
        return None
    pats = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"musco: {name} must be a glob pattern or a list of them, got {value!r}")
    return pats


@dataclass(frozen=True)
class MuscoOptions:
    """The settings of a MUSCO run; frozen, validated, JSON round trip
    (``MuscoOptions.from_dict(o.to_dict()) == o``). :func:`musco` takes one and/or the same
    fields as keywords (a keyword overrides the field).

    Attributes:
        stages: the most compress + fine-tune stages.
        finetune_steps_per_stage: SGD steps after each stage (needs ``train_loader``).
        target_macs: keep this fraction of the dense MACs; each stage's ranks make the MACs
            shrink geometrically so the last stage lands on the target (within 2%, below).
        stage_ranks: how the ranks shrink across stages: ``"vbmf"`` (EVBMF ranks softened by
            ``vbmf_factor``), a fraction in (0, 1) of each rank to keep per stage, a list of
            them (one per stage, the last repeats), or a mapping {layer name: final rank} to end
            at (e.g. a one-shot plan's ``{s.name: s.rank for s in plan.compressed}`` with
            ``target_macs=plan.macs_ratio``: the stages then interpolate from dense to exactly
            those ranks). With a target it only shapes the per-layer ranks (pure EVBMF ranks for
            ``"vbmf"``). Not a rank rule name of ``make_plan``.
        vbmf_factor: MUSCO's softening in [0, 1] of EVBMF ranks, R - f (R - R_vbmf) (1: the
            pure EVBMF rank); used by ``stage_ranks="vbmf"`` without a target.
        seed: fine-tuning of stage k is seeded from (seed, k).
        distill: fine-tune distilled from the dense model.
        finetune_lr: SGD learning rate of each stage's fine-tuning.
        include / exclude: glob patterns of layer names to compress / to keep dense.
        bn_steps: after each stage's decomposition, re-estimate the BatchNorm statistics on
            this many ``train_loader`` batches before fine-tuning (no loader: 0).
        reconstruct_steps: after each stage's decomposition (before BN re-calibration), refit
            the factorized layers to the dense model's layer outputs on this many batches
            (:func:`tensorslim.reconstruct.reconstruct`; needs ``train_loader``; 0: off).
    """

    stages: int = 3
    finetune_steps_per_stage: int = 0
    target_macs: float | None = None
    stage_ranks: str | tuple[float, ...] | Mapping[str, Any] = "vbmf"
    vbmf_factor: float = VBMF_FACTOR
    seed: int = 0
    distill: bool = True
    finetune_lr: float = 0.01
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    bn_steps: int = 50
    reconstruct_steps: int = 0

    def __post_init__(self) -> None:
        _check_count("stages", self.stages, 1)
        for name in ("finetune_steps_per_stage", "bn_steps", "reconstruct_steps"):
            _check_count(name, getattr(self, name), 0)
        if self.target_macs is not None:
            _check_number("target_macs", self.target_macs, lambda v: 0 < v <= 1,
                          "a number in (0, 1] or None")
        _check_number("vbmf_factor", self.vbmf_factor, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _check_number("finetune_lr", self.finetune_lr, lambda v: 0 < v < float("inf"),
                      "a number > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"musco: seed must be an int, got {self.seed!r}")
        if not isinstance(self.distill, bool):
            raise TypeError(f"musco: distill must be True or False, got {self.distill!r}")
        normal = {"target_macs": None if self.target_macs is None else float(self.target_macs),
                  "vbmf_factor": float(self.vbmf_factor), "finetune_lr": float(self.finetune_lr),
                  "stage_ranks": R.check_stage_ranks(self.stage_ranks),
                  "include": _patterns("include", self.include),
                  "exclude": _patterns("exclude", self.exclude)}
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MuscoOptions":
        return resolve(cls, d, {}, "MuscoOptions")


@dataclass(frozen=True)
class MuscoConfig:
    """What determines a MUSCO run's result (checked on resume): the method, the settings and
    the traced input shape. :meth:`to_dict` is the flat JSON record ``state.json`` stores."""

    method: str
    options: MuscoOptions
    example_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options.to_dict(),
                "example_shape": list(self.example_shape)}


@dataclass(frozen=True)
class MuscoResult:
    """The compressed model (eval mode), the plan that replays it from the dense model, one
    JSON-able record per finished stage, how many stages are done and why it stopped."""

    model: nn.Module
    plan: CompressionPlan
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    stages_done: int = 0
    stop_reason: str = ""


def musco(
    model: nn.Module,
    method: str,
    example_inputs: Any,
    options: MuscoOptions | Mapping[str, Any] | None = None,
    *,
    train_loader: Any = None,
    state_dir: str | Path | None = None,
    max_stages_this_call: int | None = None,
    progress: bool = True,
    **settings: Any,
) -> MuscoResult:
    """Multi-stage compression of a copy of the dense ``model`` (left untouched).

    Args:
        method: ``tucker`` | ``svd`` | ``cp`` | ``auto`` (Tucker-2 for k>1 convs, SVD else).
        example_inputs: tensor or tuple of inputs; MACs are counted for them (with batch).
        options: a :class:`MuscoOptions` (or a mapping of its fields); None: the defaults.
        train_loader: training batches for the per-stage recovery (refit, BN, fine-tuning).
        state_dir: folder for per-stage checkpoints; resume from it when it holds a run.
        max_stages_this_call: stop after this many stages in this call (resume later).
        **settings: :class:`MuscoOptions` fields, overriding ``options`` (``rank_rule=``: the
            deprecated name of ``stage_ranks``). An unknown name raises TypeError.
    """
    cfg = _config(model, method, example_inputs, _options(options, settings, train_loader))
    if max_stages_this_call is not None:
        _check_count("max_stages_this_call", max_stages_this_call, 0)
    layers, plan = _start(model, cfg, example_inputs)
    run = _Run(cfg, model, Path(state_dir) if state_dir is not None else None, progress)
    current, plan, history, done, reason = run.resume(plan)
    ran = 0
    while not done and len(history) < cfg.options.stages:
        if max_stages_this_call is not None and ran >= max_stages_this_call:
            reason = f"paused after {ran} stage(s) in this call"
            break
        plan, done, reason = _step(run, current, plan, layers, train_loader, history)
        ran += 1
    return MuscoResult(current.eval(), plan, tuple(history), len(history), reason)


def _options(options: Any, settings: dict[str, Any], loader: Any) -> MuscoOptions:
    """``options`` with the keyword ``settings`` applied, checked against the ``loader``."""
    if "rank_rule" in settings:  # the old name of stage_ranks, for exactly the same values
        if "stage_ranks" in settings:
            raise TypeError("musco: give stage_ranks= or its deprecated alias rank_rule=, not both")
        warnings.warn("musco(rank_rule=...) is deprecated; use stage_ranks= (the same values)",
                      DeprecationWarning, stacklevel=3)
        settings["stage_ranks"] = R.check_stage_ranks(settings.pop("rank_rule"), "rank_rule")
    opts = resolve(MuscoOptions, options, settings, "musco")
    if loader is None:
        if opts.reconstruct_steps:
            raise ValueError("musco: reconstruct_steps > 0 needs a train_loader (calibration images)")
        if opts.finetune_steps_per_stage:
            raise ValueError("musco: finetune_steps_per_stage > 0 needs a train_loader")
        opts = replace(opts, bn_steps=0)  # nothing to re-calibrate on
    return opts


def _config(model: nn.Module, method: str, example_inputs: Any, options: MuscoOptions) -> MuscoConfig:
    from ..cost import as_tuple

    if not isinstance(model, nn.Module):
        raise TypeError(f"musco expects an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"musco: unknown method {method!r}; multi-stage methods: {', '.join(METHODS)}")
    if example_inputs is None:
        raise ValueError("musco needs example_inputs (a tensor or tuple) to trace layer shapes")
    first = as_tuple(example_inputs)[0]
    return MuscoConfig(method, options, tuple(first.shape) if isinstance(first, torch.Tensor) else ())


def _step(run: "_Run", current: nn.Module, plan: CompressionPlan, layers: dict,
          loader: Any, history: list) -> tuple[CompressionPlan, bool, str]:
    """Run the next stage on ``current`` (appending its record to ``history``) and save it;
    returns (plan, done, why it stopped)."""
    opts, k = run.cfg.options, len(history) + 1
    new_plan, changed, goal = _next_plan(current, plan, layers, run.cfg, k)
    if not changed:
        reason = f"stage {k}: stage_ranks changes no rank (ranks stabilised)"
        run.save_state(k - 1, history, True, reason)
        return plan, True, reason
    rec = _do_stage(current, plan, new_plan, changed, run, loader, k)
    history.append(json.loads(json.dumps({**rec, "goal_macs_ratio": goal})))
    reached = opts.target_macs is not None and new_plan.macs_ratio <= opts.target_macs
    done = reached or len(history) == opts.stages
    reason = ("MAC target reached" if reached else f"{opts.stages} stages done") if done else ""
    run.save_stage(k, current, new_plan, history, done, reason)
    return new_plan, done, reason


def _start(model: nn.Module, cfg: MuscoConfig, example_inputs: Any) -> tuple[dict, CompressionPlan]:
    """The compressible layers of the dense model and the all-dense starting plan."""
    report, opts = count(model, example_inputs), cfg.options
    goal = {"include": opts.include, "exclude": opts.exclude}
    todo, kept = collect_layers(model, cfg.method, report, goal)
    specs = kept + [LayerSpec(name=l.name, layer_type=type(l.module).__name__, method=KEEP,
                              rank=None, params_before=l.params, params_after=l.params,
                              macs_before=l.macs, macs_after=l.macs, in_shape=l.in_shape,
                              out_shape=l.out_shape, reason="dense (not compressed yet)")
                    for l in todo]
    order = {lc.name: i for i, lc in enumerate(report.layers)}
    specs.sort(key=lambda s: order[s.name])
    musco_goal = {k: v for k, v in cfg.to_dict().items() if k not in ("example_shape", "seed")}
    plan_goal = json.loads(json.dumps({"musco": musco_goal, "objective": "macs"}))
    if opts.target_macs is not None:
        plan_goal["target_macs"] = opts.target_macs
    plan = CompressionPlan(layers=(), method=cfg.method, goal=plan_goal,
                           params_before=report.total_params, params_after=report.total_params,
                           macs_before=report.total_macs, macs_after=report.total_macs)
    plan = CompressionPlan.from_dict(plan.with_layers(tuple(specs)).to_dict())  # JSON-normal
    return {l.name: l for l in todo}, plan


def _next_plan(current: nn.Module, plan: CompressionPlan, layers: dict, cfg: MuscoConfig,
               k: int) -> tuple[CompressionPlan, list[str], float | None]:
    """The plan after stage ``k``, the names of the layers it changes, the stage MAC goal."""
    specs, opts = {s.name: s for s in plan.layers}, cfg.options
    factor = 1.0 if opts.target_macs is not None else opts.vbmf_factor
    guides = {name: R.guide_rank(layer, specs[name], current.get_submodule(name),
                                 opts.stage_ranks, factor, k) for name, layer in layers.items()}
    goal = None
    if opts.target_macs is None:
        new = {n: _rule_spec(layers[n], specs[n], g, why, k) for n, (g, why) in guides.items()}
    else:
        goal = R.stage_goal(plan.macs_ratio, opts.target_macs, opts.stages - k + 1)
        new = _target_specs(layers, specs, guides, plan, goal, cfg, k)
    changed = [n for n in layers if (new[n].method, new[n].rank) != (specs[n].method, specs[n].rank)]
    out = tuple(new.get(s.name, s) for s in plan.layers)
    return plan.with_layers(out), changed, goal


def _rule_spec(layer: Any, spec: LayerSpec, guide: Any, why: str, k: int) -> LayerSpec:
    if guide is None:
        return spec
    if spec.compressed:
        guide = R.shrink(spec.rank, guide)
        if guide == spec.rank:
            return spec
    new = build_spec(layer, guide, "macs")
    if not new.compressed:  # a dense layer the rule would not make cheaper
        return replace(spec, reason=new.reason)
    return replace(new, reason=f"stage {k}: {why}")


def _target_specs(layers: dict, specs: dict, guides: dict, plan: CompressionPlan, goal: float,
                  cfg: MuscoConfig, k: int) -> dict[str, LayerSpec]:
    paths = {n: R.mac_path(layers[n], specs[n], guides[n][0]) for n in layers}
    fixed = plan.macs_after - sum(specs[n].macs_after for n in layers)
    target = cfg.options.target_macs
    final = target * plan.macs_before
    ends = {n: (c, [a[-1]] * len(a)) for n, (c, a) in paths.items()}
    if R.fit_macs(ends, fixed, final)[1] > final:
        best = R.fit_macs(ends, fixed, 0)[1] / plan.macs_before
        raise ValueError(f"musco: target_macs={target} is unreachable with method "
                         f"{cfg.method!r}: the smallest ranks keep {best:.4f} of the MACs")
    idx, _ = R.fit_macs(paths, fixed, goal * plan.macs_before)
    out = {}
    for n, i in idx.items():
        if i == 0:
            out[n] = specs[n]
            continue
        rank = paths[n][0][i][0]
        why = f"stage {k}: MAC schedule {goal:.4f}, {guides[n][1] if guides[n][0] else 'uniform'}"
        out[n] = replace(build_spec(layers[n], rank, "macs"), reason=why)
    return out


def _do_stage(model: nn.Module, old: CompressionPlan, new: CompressionPlan, changed: list[str],
              run: "_Run", loader: Any, k: int) -> dict[str, Any]:
    """Apply stage ``k``'s ranks to ``model`` (through surgery) and recover it (refit, BN
    re-calibration, fine-tuning distilled from the dense model ``run.dense``)."""
    from ..surgery import compress, recompress

    t0, progress = time.perf_counter(), run.progress
    fresh = [new[n] for n in changed if not old[n].compressed]
    again = {n: new[n].rank for n in changed if old[n].compressed}
    if fresh:
        compress(model, replace(new, layers=tuple(fresh)), progress=progress)
    if again:
        recompress(model, again, options={n: dict(new[n].options) for n in again},
                   progress=progress)
    errors = {n: getattr(model.get_submodule(n), "approx_error", None) for n in changed}
    ft = recover_stage(model, run.dense, loader, run.cfg.options, k, progress)
    rec = {"stage": k, "macs": new.macs_after, "macs_ratio": new.macs_ratio,
           "params": new.params_after, "params_ratio": new.params_ratio,
           "ranks": {s.name: s.rank for s in new.compressed}, "changed": changed,
           "errors": errors, "finetune": ft, "time_s": round(time.perf_counter() - t0, 3)}
    if progress:
        print(f"musco stage {k}/{run.cfg.options.stages}: MACs ratio {new.macs_ratio:.4f}, params "
              f"ratio {new.params_ratio:.4f}, {len(changed)} layer(s) changed"
              + (f", fine-tune loss {ft['loss']:.4f} acc {ft['acc']:.4f}" if 'loss' in ft else ""), flush=True)
    return rec

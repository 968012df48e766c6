"""MUSCO: automated multi-stage compression (Gusak et al., ICCVW 2019).

Repeat { compress, fine-tune }: the first stage decomposes dense layers; later stages decompose
what is still dense and re-compress the factorized layers at smaller ranks (Tucker-2: a Tucker-2
of the core merged into the 1x1 convs; SVD: truncation of the factors' SVD; CP: CP at a smaller
rank of the current kernel), each stage fine-tuned with distillation from the original dense
model. It stops after ``stages`` stages, when a MAC target is met, or when the rank rule
changes no rank any more (EVBMF ranks stabilised).

With ``state_dir`` every finished stage is written to ``state_dir/stage_{k}/`` (a
:func:`tensorslim.io.save` checkpoint) plus ``state_dir/state.json`` (config, history), and a
later call with the same arguments resumes after the last finished stage; fine-tuning of stage
k is seeded from (seed, k), so an interrupted run ends with the same plan and weights.

    res = musco(model, "tucker", x, train_loader=train, stages=3, finetune_steps_per_stage=200,
                target_macs=0.25, state_dir="runs/musco")
    res.model, res.plan, res.history
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from ..planning import build_spec, collect_layers
from ..cost import count
from ..plan import KEEP, CompressionPlan, LayerSpec
from . import _musco_ranks as R
from ._musco_state import _Run

if TYPE_CHECKING:
    from ..recover import RecoverConfig

METHODS = ("tucker", "svd", "cp", "auto")


@dataclass(frozen=True)
class MuscoConfig:
    """What determines a MUSCO run's result (checked on resume). JSON round-trip."""

    method: str
    stages: int
    finetune_steps_per_stage: int
    target_macs: float | None
    vbmf_factor: float
    rank_rule: Any
    seed: int
    distill: bool
    finetune_lr: float
    example_shape: tuple[int, ...]
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    bn_steps: int = 50
    reconstruct_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({**asdict(self), "rank_rule": R.rule_to_json(self.rank_rule)}))


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
    *,
    train_loader: Any = None,
    stages: int = 3,
    finetune_steps_per_stage: int = 0,
    target_macs: float | None = None,
    vbmf_factor: float = 0.8,
    rank_rule: str | float | Sequence[float] | Mapping[str, Any] = "vbmf",
    state_dir: str | Path | None = None,
    seed: int = 0,
    distill: bool = True,
    finetune_lr: float = 0.01,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_stages_this_call: int | None = None,
    bn_steps: int = 50,
    reconstruct_steps: int = 0,
    progress: bool = True,
) -> MuscoResult:
    """Multi-stage compression of a copy of the dense ``model`` (left untouched).

    Args:
        method: ``tucker`` | ``svd`` | ``cp`` | ``auto`` (Tucker-2 for k>1 convs, SVD else).
        example_inputs: tensor or tuple of inputs; MACs are counted for them (with batch).
        stages: the most compress + fine-tune stages.
        finetune_steps_per_stage: SGD steps after each stage (needs ``train_loader``).
        target_macs: keep this fraction of the dense MACs; each stage's ranks make the MACs
            shrink geometrically so the last stage lands on the target (within 2%, below).
        vbmf_factor: MUSCO's softening in [0, 1] of EVBMF ranks, R - f (R - R_vbmf)
            (rule ``vbmf`` without a target).
        rank_rule: ``"vbmf"``, or a fraction in (0, 1) (or one per stage) of each rank to
            keep, or a mapping {layer name: final rank} to end at (e.g. a one-shot plan's
            ``{s.name: s.rank for s in plan.compressed}`` with ``target_macs=plan.macs_ratio``:
            the stages then interpolate from dense to exactly those ranks). With a target it
            only shapes the per-layer ranks (pure EVBMF ranks for ``"vbmf"``).
        state_dir: folder for per-stage checkpoints; resume from it when it holds a run.
        max_stages_this_call: stop after this many stages in this call (resume later).
        bn_steps: after each stage's decomposition, re-estimate the BatchNorm statistics on
            this many ``train_loader`` batches before fine-tuning (0, or no loader: skipped).
        reconstruct_steps: after each stage's decomposition (before BN re-calibration), refit
            the factorized layers to the dense model's layer outputs on this many batches
            (:func:`tensorslim.reconstruct.reconstruct`; needs ``train_loader``; 0: off).
    """
    cfg = _config(model, method, example_inputs, stages, finetune_steps_per_stage, target_macs,
                  vbmf_factor, rank_rule, seed, distill, finetune_lr, include, exclude)
    if isinstance(bn_steps, bool) or not isinstance(bn_steps, int) or bn_steps < 0:
        raise ValueError(f"musco: bn_steps must be an int >= 0, got {bn_steps!r}")
    cfg = replace(cfg, bn_steps=bn_steps if train_loader is not None else 0)
    if isinstance(reconstruct_steps, bool) or not isinstance(reconstruct_steps, int) \
            or reconstruct_steps < 0:
        raise ValueError(f"musco: reconstruct_steps must be an int >= 0, got {reconstruct_steps!r}")
    if reconstruct_steps and train_loader is None:
        raise ValueError("musco: reconstruct_steps > 0 needs a train_loader (calibration images)")
    cfg = replace(cfg, reconstruct_steps=reconstruct_steps)
    if finetune_steps_per_stage and train_loader is None:
        raise ValueError("musco: finetune_steps_per_stage > 0 needs a train_loader")
    if max_stages_this_call is not None and max_stages_this_call < 0:
        raise ValueError(f"musco: max_stages_this_call must be >= 0, got {max_stages_this_call}")
    layers, plan = _start(model, cfg, example_inputs)
    run = _Run(cfg, model, Path(state_dir) if state_dir is not None else None, progress)
    current, plan, history, done, reason = run.resume(plan)
    ran = 0
    while not done and len(history) < cfg.stages:
        if max_stages_this_call is not None and ran >= max_stages_this_call:
            reason = f"paused after {ran} stage(s) in this call"
            break
        plan, done, reason = _step(run, current, plan, layers, train_loader, history)
        ran += 1
    return MuscoResult(current.eval(), plan, tuple(history), len(history), reason)


def _step(run: "_Run", current: nn.Module, plan: CompressionPlan, layers: dict,
          loader: Any, history: list) -> tuple[CompressionPlan, bool, str]:
    """Run the next stage on ``current`` (appending its record to ``history``) and save it;
    returns (plan, done, why it stopped)."""
    cfg, k = run.cfg, len(history) + 1
    new_plan, changed, goal = _next_plan(current, plan, layers, cfg, k)
    if not changed:
        reason = f"stage {k}: the rank rule changes no rank (ranks stabilised)"
        run.save_state(k - 1, history, True, reason)
        return plan, True, reason
    rec = _do_stage(current, plan, new_plan, changed, run.dense, loader, cfg, k, run.progress)
    history.append(json.loads(json.dumps({**rec, "goal_macs_ratio": goal})))
    reached = cfg.target_macs is not None and new_plan.macs_ratio <= cfg.target_macs
    done = reached or len(history) == cfg.stages
    reason = ("MAC target reached" if reached else f"{cfg.stages} stages done") if done else ""
    run.save_stage(k, current, new_plan, history, done, reason)
    return new_plan, done, reason


def _config(model: nn.Module, method: str, example_inputs: Any, stages: int, steps: int,
            target: float | None, factor: float, rule: Any, seed: int, distill: bool, lr: float,
            include: Any, exclude: Any) -> MuscoConfig:
    from ..cost import as_tuple

    if not isinstance(model, nn.Module):
        raise TypeError(f"musco expects an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"musco: unknown method {method!r}; multi-stage methods: {', '.join(METHODS)}")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"musco: stages must be an int >= 1, got {stages!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"musco: finetune_steps_per_stage must be an int >= 0, got {steps!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0 < target <= 1):
        raise ValueError(f"musco: target_macs must be a number in (0, 1] or None, got {target!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
        raise ValueError(f"musco: vbmf_factor must be a number in [0, 1], got {factor!r}")
    if example_inputs is None:
        raise ValueError("musco needs example_inputs (a tensor or tuple) to trace layer shapes")
    first = as_tuple(example_inputs)[0]
    shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
    pats = lambda p: None if p is None else ((p,) if isinstance(p, str) else tuple(p))  # noqa: E731
    return MuscoConfig(method, stages, steps, None if target is None else float(target),
                       float(factor), R.check_rule(rule), int(seed), bool(distill), float(lr),
                       shape, pats(include), pats(exclude))


def _start(model: nn.Module, cfg: MuscoConfig, example_inputs: Any) -> tuple[dict, CompressionPlan]:
    """The compressible layers of the dense model and the all-dense starting plan."""
    report = count(model, example_inputs)
    goal = {"include": cfg.include, "exclude": cfg.exclude}
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
    if cfg.target_macs is not None:
        plan_goal["target_macs"] = cfg.target_macs
    plan = CompressionPlan(layers=(), method=cfg.method, goal=plan_goal,
                           params_before=report.total_params, params_after=report.total_params,
                           macs_before=report.total_macs, macs_after=report.total_macs)
    plan = CompressionPlan.from_dict(plan.with_layers(tuple(specs)).to_dict())  # JSON-normal
    return {l.name: l for l in todo}, plan


def _next_plan(current: nn.Module, plan: CompressionPlan, layers: dict, cfg: MuscoConfig,
               k: int) -> tuple[CompressionPlan, list[str], float | None]:
    """The plan after stage ``k``, the names of the layers it changes, the stage MAC goal."""
    specs = {s.name: s for s in plan.layers}
    guides = {}
    for name, layer in layers.items():
        factor = 1.0 if cfg.target_macs is not None else cfg.vbmf_factor
        guides[name] = R.guide_rank(layer, specs[name], current.get_submodule(name),
                                    cfg.rank_rule, factor, k)
    goal = None
    if cfg.target_macs is None:
        new = {n: _rule_spec(layers[n], specs[n], g, why, k) for n, (g, why) in guides.items()}
    else:
        goal = R.stage_goal(plan.macs_ratio, cfg.target_macs, cfg.stages - k + 1)
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
    final = cfg.target_macs * plan.macs_before
    ends = {n: (c, [a[-1]] * len(a)) for n, (c, a) in paths.items()}
    if R.fit_macs(ends, fixed, final)[1] > final:
        best = R.fit_macs(ends, fixed, 0)[1] / plan.macs_before
        raise ValueError(f"musco: target_macs={cfg.target_macs} is unreachable with method "
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
              dense: nn.Module, loader: Any, cfg: MuscoConfig, k: int,
              progress: bool) -> dict[str, Any]:
    """Apply stage ``k``'s ranks to ``model`` (through surgery) and recover it (refit, BN
    re-calibration, fine-tuning distilled from the ``dense`` model)."""
    from ..surgery import compress, recompress

    t0 = time.perf_counter()
    fresh = [new[n] for n in changed if not old[n].compressed]
    again = {n: new[n].rank for n in changed if old[n].compressed}
    if fresh:
        compress(model, replace(new, layers=tuple(fresh)), progress=progress)
    if again:
        recompress(model, again, options={n: dict(new[n].options) for n in again},
                   progress=progress)
    errors = {n: getattr(model.get_submodule(n), "approx_error", None) for n in changed}
    ft = _recover_stage(model, dense, loader, cfg, k, progress)
    rec = {"stage": k, "macs": new.macs_after, "macs_ratio": new.macs_ratio,
           "params": new.params_after, "params_ratio": new.params_ratio,
           "ranks": {s.name: s.rank for s in new.compressed}, "changed": changed,
           "errors": errors, "finetune": ft, "time_s": round(time.perf_counter() - t0, 3)}
    if progress:
        print(f"musco stage {k}/{cfg.stages}: MACs ratio {new.macs_ratio:.4f}, params ratio "
              f"{new.params_ratio:.4f}, {len(changed)} layer(s) changed"
              + (f", fine-tune loss {ft['loss']:.4f} acc {ft['acc']:.4f}" if 'loss' in ft else ""), flush=True)
    return rec


class _StageLoader:
    """A training loader whose epochs are offset per stage (new batch orders every stage,
    deterministic from the stage); everything else is the wrapped loader's."""

    def __init__(self, inner: Any, offset: int, start: int | None = None) -> None:
        # ``start``: the epoch (within the stage) set when it is first iterated
        self.inner, self.offset, self.start = inner, offset, start

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        if self.start is not None:
            self.set_epoch(self.start)
            self.start = None
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(self.offset + epoch)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "start"):
            raise AttributeError(name)
        if name == "shard" and hasattr(self.inner, "shard"):
            return lambda *a, **kw: _StageLoader(self.inner.shard(*a, **kw), self.offset, self.start)
        return getattr(self.inner, name)


def _recover_config(cfg: MuscoConfig, k: int) -> "RecoverConfig":
    """Stage ``k``'s recovery: refit, BatchNorm re-calibration, KD fine-tuning seeded by (seed, k)."""
    from ..recover import RecoverConfig

    return RecoverConfig(reconstruct_steps=cfg.reconstruct_steps, bn_steps=cfg.bn_steps,
                         finetune_steps=cfg.finetune_steps_per_stage, lr=cfg.finetune_lr,
                         distill=cfg.distill, seed=cfg.seed * 1_000_003 + k)


def _stage_loaders(loader: Any, k: int) -> dict[str, Any]:
    """Stage ``k``'s loader per recovery step: the refit and the BatchNorm re-calibration each
    get a fixed batch order of their own (resumed runs see the same batches), fine-tuning
    the stage's epochs."""
    if loader is None:
        return {}
    return {"reconstruct": _StageLoader(loader, 10_000 * k, start=9_998),
            "bn": _StageLoader(loader, 10_000 * k, start=9_999),
            "finetune": _StageLoader(loader, 10_000 * k)}


def _recover_stage(model: nn.Module, dense: nn.Module, loader: Any, cfg: MuscoConfig, k: int,
              progress: bool) -> dict[str, Any]:
    """Data-aware refit (``cfg.reconstruct_steps`` batches), BatchNorm re-calibration
    (``cfg.bn_steps``) then ``finetune_steps_per_stage`` SGD steps; the record of each."""
    from ..recover import recover

    rc = _recover_config(cfg, k)
    res = recover(model, dense, rc, loaders=_stage_loaders(loader, k), progress=progress)
    out = {key: res.history[key] for key in ("reconstruct", "bn_batches") if key in res.history}
    if "finetune" not in res.history:
        return out
    hist = res.history["finetune"]
    return out | {"steps": hist["steps"], "loss": hist["loss"][-1], "acc": hist["acc"][-1], "seed": rc.seed}

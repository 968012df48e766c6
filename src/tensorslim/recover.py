"""Recovery after decomposition: data-aware refit -> BatchNorm re-calibration -> fine-tuning.

Every method that compresses a trained network (one-shot, each MUSCO stage, the CLI's
``compress``, the demo) repairs the compressed model the same way, in the same order:

1. ``reconstruct``: refit each factorized layer's last factors by least squares so its
   outputs match the dense layer's (:func:`tensorslim.reconstruct.reconstruct`);
2. ``bn``: re-estimate the BatchNorm running statistics (:func:`tensorslim.calibrate.recalibrate_bn`);
3. ``finetune``: SGD steps, distilled from the dense model (:func:`tensorslim.train.fine_tune`).

A step with 0 batches / steps is skipped. :class:`RecoverConfig` says how much of each;
:func:`recover` runs them and records what ran.

    res = recover(student, dense, RecoverConfig(finetune_steps=400), train_loader=train)
    res.model, res.ran, res.history
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .configs import check_int
from .reconstruct import DEFAULT_STEPS as DEFAULT_RECONSTRUCT_STEPS

STEPS = ("reconstruct", "bn", "finetune")
POINTS = ("start", *STEPS)  # where an ``evaluate`` function may be called: before / after a step
DEFAULT_BN_STEPS = 50  # BatchNorm re-calibration batches when no refit runs


def resolve_bn_steps(bn_steps: int | None, reconstruct_steps: int) -> int:
    """BatchNorm re-calibration batches: as given, or for None 50 without a data-aware refit
    and 0 after one (the refit reproduces the dense layers' outputs, so the dense statistics
    fit them; re-estimating them after it lowered the shipped VGG-16's accuracy)."""
    if bn_steps is None:
        return 0 if reconstruct_steps else DEFAULT_BN_STEPS
    return bn_steps


def resolve_reconstruct_steps(reconstruct_steps: int | None, finetune_steps: int,
                              multi_stage: bool = False) -> int:
    """Data-aware refit batches: as given, or for None 16 (``DEFAULT_RECONSTRUCT_STEPS``) when
    the model is used without fine-tuning and 0 before fine-tuning or MUSCO stages (a refit
    start helped fine-tuning at a mild MAC target and hurt it at a strong one; see README)."""
    if reconstruct_steps is None:
        return 0 if finetune_steps or multi_stage else DEFAULT_RECONSTRUCT_STEPS
    return reconstruct_steps


def _check_count(name: str, value: Any, *, none_ok: bool = False) -> None:
    check_int(name, value, 0, none_ok=none_ok)


@dataclass(frozen=True)
class RecoverConfig:
    """How much of each recovery step to run (0: skip it). JSON round-trip.

    ``reconstruct_steps``: batches for the data-aware refit. ``bn_steps``: batches for the
    BatchNorm re-calibration; None means 50 without a refit and 0 after one
    (:func:`resolve_bn_steps`). ``finetune_steps``: optimizer steps (SGD, cosine schedule from
    ``lr``), distilled from the dense model when ``distill`` (loss ``(1 - distill_alpha) * CE +
    distill_alpha * KD`` at temperature ``distill_T``), seeded with ``seed``."""

    reconstruct_steps: int = 0
    bn_steps: int | None = None
    finetune_steps: int = 0
    lr: float = 0.01
    distill: bool = True
    distill_alpha: float = 0.5
    distill_T: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_count("reconstruct_steps", self.reconstruct_steps)
        _check_count("bn_steps", self.bn_steps, none_ok=True)
        _check_count("finetune_steps", self.finetune_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if not isinstance(self.distill, bool):
            raise TypeError(f"distill must be True or False, got {self.distill!r}")
        if not 0.0 <= self.distill_alpha <= 1.0 or not self.distill_T > 0:
            raise ValueError("need 0 <= distill_alpha <= 1 and distill_T > 0, got "
                             f"{self.distill_alpha!r}, {self.distill_T!r}")

    @property
    def bn_batches(self) -> int:
        """The BatchNorm re-calibration batches that will run (``bn_steps`` resolved)."""
        return resolve_bn_steps(self.bn_steps, self.reconstruct_steps)

    def steps(self) -> tuple[str, ...]:
        """The names of the steps that will run, in order (a subset of :data:`STEPS`)."""
        counts = (self.reconstruct_steps, self.bn_batches, self.finetune_steps)
        return tuple(name for name, n in zip(STEPS, counts) if n)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RecoverConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RecoverConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "RecoverConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class RecoverResult:
    """The recovered model (eval mode, the same object that was passed in), the config that
    ran, the names of the steps that ran, the record of each (``history``: ``"reconstruct"`` per-layer fits as dicts,
    ``"bn_batches"``, ``"finetune"`` the :func:`tensorslim.train.train` history) and, if an
    ``evaluate`` function was given, its value at each point (``"start"`` and after each step)."""

    model: nn.Module
    config: RecoverConfig
    ran: tuple[str, ...] = ()
    history: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)


def recover(model: nn.Module, dense: nn.Module, config: RecoverConfig = RecoverConfig(), *,
            train_loader: Any = None, loaders: Mapping[str, Any] | None = None,
            evaluate: Callable[[nn.Module], float] | None = None,
            evaluate_at: Collection[str] | None = None, progress: bool = True) -> RecoverResult:
    """Run the recovery steps of ``config`` on the compressed ``model`` (in place), in the
    order refit -> BatchNorm re-calibration -> fine-tune; ``dense`` (the uncompressed model,
    left as it is) is the refit's target and the distillation teacher.

    Batches ``(x (B, ...), y (B,))`` come from ``train_loader``; ``loaders`` may give a loader
    per step name instead (MUSCO gives each stage and step a batch order of its own). A step
    that runs without a loader raises ValueError. ``evaluate(model) -> accuracy`` is called
    at each point of ``evaluate_at`` (default: ``"start"`` and after every step that ran).
    """
    if not isinstance(model, nn.Module) or not isinstance(dense, nn.Module):
        raise TypeError(f"recover expects nn.Modules, got {type(model).__name__} and "
                        f"{type(dense).__name__}")
    if not isinstance(config, RecoverConfig):
        raise TypeError(f"recover: config must be a RecoverConfig, got {type(config).__name__}")
    loaders = dict(loaders or {})
    bad = sorted(set(loaders) - set(STEPS)) + sorted(set(evaluate_at or ()) - set(POINTS))
    if bad:
        raise ValueError(f"recover: unknown step name(s) {bad}; known: {list(POINTS)}")
    ran = config.steps()
    for name in ran:
        loaders.setdefault(name, train_loader)
        if loaders[name] is None:
            raise ValueError(f"recover: {name} needs a train_loader ({_COUNT[name]} = "
                             f"{_count(config, name)} > 0); pass one or set it to 0")
    points = set(POINTS if evaluate_at is None else evaluate_at)
    res = RecoverResult(model, config, ran)
    _measure(res, "start", evaluate, points)
    for name in ran:
        _RUNNERS[name](res, dense, config, loaders[name], progress)
        model.eval()
        _measure(res, name, evaluate, points)
    model.eval()
    return res


_COUNT = {"reconstruct": "reconstruct_steps", "bn": "bn_steps", "finetune": "finetune_steps"}


def _count(config: RecoverConfig, name: str) -> int:
    return config.bn_batches if name == "bn" else getattr(config, _COUNT[name])


def _measure(res: RecoverResult, point: str, evaluate: Callable[[nn.Module], float] | None,
             points: set[str]) -> None:
    if evaluate is not None and point in points:
        res.accuracy[point] = float(evaluate(res.model))


def _refit(res: RecoverResult, dense: nn.Module, cfg: RecoverConfig, loader: Any,
           progress: bool) -> None:
    from .reconstruct import reconstruct

    fits = reconstruct(res.model, dense, loader, steps=cfg.reconstruct_steps, progress=progress)
    res.history["reconstruct"] = [dataclasses.asdict(f) for f in fits]


def _recalibrate(res: RecoverResult, dense: nn.Module, cfg: RecoverConfig, loader: Any,
                 progress: bool) -> None:
    from .calibrate import recalibrate_bn

    res.history["bn_batches"] = recalibrate_bn(res.model, loader, steps=cfg.bn_batches,
                                               progress=progress)


def _fine_tune(res: RecoverResult, dense: nn.Module, cfg: RecoverConfig, loader: Any,
               progress: bool) -> None:
    from .train import fine_tune

    teacher = copy.deepcopy(dense).eval() if cfg.distill else None
    res.history["finetune"] = fine_tune(
        res.model, loader, steps=cfg.finetune_steps, lr=cfg.lr, teacher=teacher,
        distill_alpha=cfg.distill_alpha, distill_T=cfg.distill_T, seed=cfg.seed,
        progress=progress, log_every=0)


_RUNNERS = {"reconstruct": _refit, "bn": _recalibrate, "finetune": _fine_tune}

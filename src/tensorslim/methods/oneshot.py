"""One-shot compression: plan from a goal, decompose every chosen layer, optionally fine-tune
(with knowledge distillation from the dense model)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..plan import CompressionPlan, make_plan
from ..surgery import compress


@dataclass(frozen=True)
class OneShotResult:
    """The compressed model, its plan and the history: the fine-tuning record of
    :func:`tensorslim.train.train` plus ``bn_batches`` (BatchNorm re-calibration batches), if any."""

    model: nn.Module
    plan: CompressionPlan
    history: dict[str, Any] = field(default_factory=dict)


def oneshot(
    model: nn.Module,
    method: str,
    example_inputs: Any,
    *,
    train_loader: Any = None,
    finetune_steps: int = 0,
    finetune_lr: float = 0.01,
    distill: bool = True,
    bn_steps: int = 50,
    progress: bool = True,
    plan: CompressionPlan | None = None,
    **goal: Any,
) -> OneShotResult:
    """Compress a copy of ``model`` (the input is left untouched) and fine-tune it.

    ``goal`` is passed to :func:`tensorslim.make_plan` (``target_macs=0.25``, ``ranks=...``);
    alternatively pass a ready ``plan``. With ``finetune_steps > 0`` a ``train_loader`` is
    required; ``distill`` uses the dense model as the teacher. Given a ``train_loader``, the
    BatchNorm statistics are first re-estimated on ``bn_steps`` of its batches
    (:func:`tensorslim.calibrate.recalibrate_bn`; 0 skips it), before any fine-tuning.
    """
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if isinstance(bn_steps, bool) or not isinstance(bn_steps, int) or bn_steps < 0:
        raise ValueError(f"bn_steps must be an int >= 0, got {bn_steps!r}")
    if finetune_steps and train_loader is None:
        raise ValueError("finetune_steps > 0 needs a train_loader")
    if plan is None:
        plan = make_plan(model, method, example_inputs, **goal)
    student = compress(copy.deepcopy(model), plan, progress=progress)
    history: dict[str, Any] = {}
    if train_loader is not None and bn_steps:
        from ..calibrate import recalibrate_bn

        history["bn_batches"] = recalibrate_bn(student, train_loader, steps=bn_steps, progress=progress)
    if finetune_steps:
        from ..train import fine_tune

        teacher = copy.deepcopy(model).eval() if distill else None
        epochs = max(1, -(-finetune_steps // max(1, len(train_loader))))
        history |= fine_tune(student, train_loader, epochs=epochs, max_steps=finetune_steps,
                            lr=finetune_lr, teacher=teacher, progress=progress, log_every=0)
    return OneShotResult(student.eval(), plan, history)

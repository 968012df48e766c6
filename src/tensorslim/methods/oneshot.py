"""One-shot compression: plan from a goal, decompose every chosen layer, optionally fine-tune
(with knowledge distillation from the dense model)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..plan import CompressionPlan
from ..planning import make_plan
from ..recover import DEFAULT_BN_STEPS, RecoverConfig, recover, resolve_bn_steps  # noqa: F401
from ..surgery import compress, layer_errors


@dataclass(frozen=True)
class OneShotResult:
    """The compressed model, its plan (with each layer's measured weight approximation error)
    and the history: the fine-tuning record of
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
    bn_steps: int | None = None,
    reconstruct_steps: int = 0,
    progress: bool = True,
    plan: CompressionPlan | None = None,
    calibration: Any = None,
    **goal: Any,
) -> OneShotResult:
    """Compress a copy of ``model`` (the input is left untouched) and fine-tune it.

    ``goal`` is passed to :func:`tensorslim.make_plan` (``target_macs=0.25``, ``ranks=...``);
    alternatively pass a ready ``plan``. With ``finetune_steps > 0`` a ``train_loader`` is
    required; ``distill`` uses the dense model as the teacher. The recovery runs through
    :func:`tensorslim.recover.recover`: ``reconstruct_steps > 0`` first refits every factorized
    layer's last factors on that many batches so its outputs match the dense layer's (needs a
    ``train_loader``; ``history["reconstruct"]`` lists the per-layer output errors); given a
    ``train_loader``, the BatchNorm statistics are then re-estimated on ``bn_steps`` of its
    batches (0 skips it; None: 50 without a refit, 0 after one, see
    :func:`tensorslim.recover.resolve_bn_steps`); then ``finetune_steps`` steps of fine-tuning.
    ``calibration``: model inputs (an iterable of tensors, tuples or tokenizer dicts) or a
    :class:`tensorslim.calibration.Calibration`, collected once on the dense model: the plan
    prices SVD Linear ranks by their output error and they are decomposed data-aware.
    """
    try:
        config = RecoverConfig(reconstruct_steps=reconstruct_steps, bn_steps=bn_steps,
                               finetune_steps=finetune_steps, lr=finetune_lr, distill=distill)
    except (TypeError, ValueError) as e:
        raise type(e)(f"oneshot: {e}") from None
    if train_loader is None:  # without data only the BatchNorm step is skipped quietly
        config = replace(config, bn_steps=0)
        if config.steps():  # fail before the decomposition
            name = {"reconstruct": "reconstruct_steps", "finetune": "finetune_steps"}[config.steps()[0]]
            raise ValueError(f"oneshot: {name} > 0 needs a train_loader (training images)")
    if calibration is not None:
        from ..calibration import as_calibration

        calibration = as_calibration(model, calibration, progress=progress)
    if plan is None:
        plan = make_plan(model, method, example_inputs, calibration=calibration, **goal)
    student = compress(copy.deepcopy(model), plan, progress=progress, calibration=calibration)
    plan = plan.with_errors(layer_errors(student, plan))  # as measured while decomposing
    res = recover(student, model, config, train_loader=train_loader, progress=progress)
    history = {k: res.history[k] for k in ("reconstruct", "bn_batches") if k in res.history}
    history |= res.history.get("finetune", {})
    return OneShotResult(res.model, plan, history)

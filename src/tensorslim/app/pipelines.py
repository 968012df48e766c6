"""``tensorslim compress --method NAME`` for a registered pipeline (LTC, NORTON, CCPD, RON,
ASNet: see :mod:`tensorslim.methods.registry`): its goal keywords, its data, its row."""
from __future__ import annotations

from itertools import islice
from typing import Any

import torch

from ..report import ModelSummary
from .sources import Loaded, train_loader
from .summary import summarize


def is_pipeline(method: str) -> bool:
    """Whether ``method`` names a registered pipeline (methods/registry.py), not a factorization."""
    from ..plan import METHODS

    return method not in METHODS


def pipeline_arguments(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The pipeline ``cfg.method`` and its entry function's goal keywords; ValueError for a
    goal or setting it does not take (checked before any work)."""
    from ..methods.registry import pipeline

    p = pipeline(cfg.method)
    if cfg.multi_stage:
        raise ValueError(f"--method {cfg.method} is a pipeline of its own; --multi-stage is MUSCO's "
                         f"(with --method tucker, cp, svd or auto)")
    return p, p.goal_kwargs(cfg.goal)


def pipeline_recovered(cfg: Any, src: Loaded, x1: torch.Tensor, test: Any) -> tuple[Any, list[ModelSummary]]:
    """A registered pipeline (LTC, NORTON, ...) on the loaded model with the training images
    (or, for a pipeline that takes ``calibration``, their inputs); its own fine-tuning runs
    ``cfg.finetune_steps`` steps. The result and its summary row."""
    p, kwargs = pipeline_arguments(cfg)
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if p.data != "none" or cfg.finetune_steps else None
    if p.data == "calibration":  # model inputs only
        kwargs["calibration"] = [x for x, _ in islice(train, max(1, cfg.reconstruct_steps or 16))]
    if p.data == "train_loader" or cfg.finetune_steps:  # a calibration pipeline fine-tunes on it too
        kwargs["train_loader"] = train
    if cfg.finetune_steps:
        kwargs["finetune_steps"] = cfg.finetune_steps
    res = p.run(src.model, x1, progress=True, seed=cfg.seed, **kwargs)
    print(res.plan.table(), flush=True)
    tuned = f" + {cfg.finetune_steps} steps fine-tune" if cfg.finetune_steps else ""
    return res, [summarize(f"{cfg.method}{tuned}", res.model.eval(), test, x1, None, cfg.threads)]


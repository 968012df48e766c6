"""Batch-norm re-calibration after compression.

A factorized layer's output differs slightly from the dense layer's, and the differences add
up through the network: the running mean / variance that every BatchNorm after a compressed
layer learned on the dense network no longer match the activations it now sees. Re-estimating
those statistics on a few hundred training images (forward passes only, no gradient, no
weight changes) repairs much of the accuracy lost before any fine-tuning.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``model`` that track running statistics, as (name, module)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[Any], *, steps: int = 50,
                   progress: bool = False) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``steps`` batches of
    ``loader`` (each batch ``(x, ...)`` or ``x``; x of shape (B, C, H, W) for the model).

    The statistics are reset and then averaged with equal weight over the batches (a
    cumulative average, ``momentum=None``), so the result does not depend on the BatchNorm's
    momentum. Weights are untouched; the model's train/eval mode and every BatchNorm's
    momentum are restored. Returns the number of batches used (at most ``steps``: fewer when
    the loader runs out). A model without BatchNorm is left as it is (returns 0).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_bn expects an nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"recalibrate_bn: steps must be an int >= 1, got {steps!r}")
    bns = batchnorms(model)
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for _, m in bns]
    device = next(model.parameters()).device
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for batch in tqdm(loader, total=steps, desc="BN re-calibration", disable=not progress):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
            if used >= steps:
                break
    finally:
        for (_, m), mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if used == 0:
        raise ValueError("recalibrate_bn: the loader yielded no batches")
    return used

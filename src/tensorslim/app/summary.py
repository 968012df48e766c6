"""Summary rows (accuracy, params, MACs, latency) of the models a pipeline compares, with
latencies measured side by side."""
from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..report import ModelSummary


def summarize(label: str, model: nn.Module, test: Any, x1: torch.Tensor, xb: torch.Tensor | None,
              threads: int, repeats: int = 15, *, accuracy: float | None = None) -> ModelSummary:
    """Accuracy on ``test`` (``accuracy`` when given; None if both are None), params, MACs per
    image on ``x1`` (1, C, H, W), median latency on the batch ``xb`` (None if ``xb`` is None:
    see :func:`with_side_by_side_latency`)."""
    from ..cost import count, measure_latency

    acc = accuracy if accuracy is not None or test is None else test_accuracy(test)(model)
    c = count(model, x1)
    lat = None if xb is None else measure_latency(model, xb, repeats=repeats, warmup=3,
                                                  threads=threads).median_ms
    return ModelSummary(label, acc, c.total_params, c.total_macs, lat)


def test_accuracy(test: Any) -> Any:
    """``model -> top-1 accuracy on test`` (the ``evaluate`` function of :func:`tensorslim.recover.recover`)."""
    from ..train import evaluate

    return lambda model: evaluate(model, test)["accuracy"]


def recovered_rows(method: str, res: Any, x1: torch.Tensor, threads: int,
                   labels: Mapping[str, str]) -> list[ModelSummary]:
    """Summary rows of a :func:`tensorslim.recover.recover` result ``res``: one per point it
    evaluated, labelled by ``labels`` or else by the step (``+ N steps KD`` after fine-tuning)."""
    rc = res.config
    names = {"start": f"{method} (no fine-tune)",
             "reconstruct": f"{method} + data-aware refit ({rc.reconstruct_steps} batches, least squares)",
             "bn": f"{method} + BN re-calibration ({rc.bn_batches} batches, no gradient steps)",
             "finetune": f"{method} + {rc.finetune_steps} steps KD", **labels}
    return [summarize(names[p], res.model, None, x1, None, threads, accuracy=a)
            for p, a in res.accuracy.items()]


LATENCY_ROUNDS = 5
LATENCY_NOTE = (f"dense and compressed timed interleaved with BatchNorms folded (tensorslim.fuse), "
                f"median of {LATENCY_ROUNDS} rounds of 5 calls, each in its faster memory layout "
                "(NCHW or channels_last); the compressed rows share one architecture and one measurement")


def latency_note() -> str:
    """:data:`LATENCY_NOTE` plus the memory allocator this process runs on."""
    from ..runtime import allocator

    return f"{LATENCY_NOTE}; memory allocator: {allocator()}"


def side_by_side_latency(models: Sequence[nn.Module], xb: torch.Tensor | Sequence[torch.Tensor],
                         threads: int, rounds: int = LATENCY_ROUNDS, repeats: int = 5) -> list[float]:
    """Latency (ms) of each model on ``xb`` (one input for all, or one per model), measured
    interleaved: every round times each model (``repeats`` calls, median), the result is the
    median over rounds. On a shared machine the load drifts; interleaving keeps the ratios
    between the models honest."""
    from ..cost import measure_latency

    inputs = [xb] * len(models) if isinstance(xb, torch.Tensor) else list(xb)
    if len(inputs) != len(models):
        raise ValueError(f"side_by_side_latency: {len(inputs)} inputs for {len(models)} models; "
                         f"give one tensor or one per model")
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for t, m, x in zip(times, models, inputs):
            t.append(measure_latency(m, x, repeats=repeats, warmup=2, threads=threads).median_ms)
    return [statistics.median(t) for t in times]


def with_side_by_side_latency(rows: Sequence[ModelSummary], dense: nn.Module, compressed: nn.Module,
                              xb: torch.Tensor, threads: int,
                              x1: torch.Tensor | None = None) -> list[ModelSummary]:
    """``rows`` (first the dense model, then variants of ONE compressed architecture: before and
    after BN re-calibration / fine-tuning) with latencies from one interleaved measurement of
    ``dense`` and ``compressed`` at the batch ``xb`` (and at batch 1 on ``x1`` when given).
    Weights do not change latency; measuring each row separately would show the machine's
    drift as differences. Both models are timed as deployed: BatchNorms folded
    (:func:`tensorslim.fuse`, on copies) and each in its faster memory layout (NCHW or
    channels_last for a 4-D input)."""
    from ..fusion import fuse

    pair = [fuse(copy.deepcopy(m).eval(), inplace=True) for m in (dense, compressed)]
    lat = _best_layout(pair, xb, threads)
    lat1 = _best_layout(pair, x1, threads) if x1 is not None else (None, None)
    return [dataclasses.replace(r, latency_ms=lat[min(i, 1)], latency1_ms=lat1[min(i, 1)])
            for i, r in enumerate(rows)]


def _best_layout(pair: Sequence[nn.Module], x: torch.Tensor, threads: int) -> tuple[float, float]:
    """(dense ms, compressed ms) on ``x``, each the faster of NCHW and channels_last (4-D
    inputs), all four timed interleaved."""
    models, inputs = list(pair), [x, x]
    if x.dim() == 4:
        cl = torch.channels_last
        models += [copy.deepcopy(m).to(memory_format=cl) for m in pair]
        inputs += [x.contiguous(memory_format=cl)] * 2
    t = side_by_side_latency(models, inputs, threads)
    return min(t[0::2]), min(t[1::2])

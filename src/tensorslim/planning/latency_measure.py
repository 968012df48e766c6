"""Measuring a latency table: every compressible layer dense and at its timed ranks, and the
whole dense model, as they run after :func:`tensorslim.fuse` in the plan's layout and batch.

* The dense layers timed are the fused model's own modules (a BatchNorm folded into a conv
  gives it a bias) and the candidates are built like them (``like``: random factors; a
  latency does not depend on the values).
* Each layer is fed a tensor of the shape AND strides its input has inside the fused model
  (a conv after a 1-channel conv may get an NCHW input in a channels-last model and then
  pays a layout conversion; a traced shape alone would hide it).
* The whole model is timed in the same interleaved rounds as every layer table, and each
  table is scaled by (median model time / its own model time): on a shared machine the
  speed drifts between tables, and the rest of the model (measured model minus the timed
  dense layers) is only right when all terms are on one scale.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ..cost import as_tuple
from .candidates import PlannedLayer
from .latency import SYSTEM_MALLOC, LatencySettings, LatencyTable, LayerTimes, timing_ranks
from .latency_cache import LatencyCache, machine_key
from .latency_timer import DENSE, InterleavedTimer, TimingJob, run_timer, timer_name

Where = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, strides) of a layer's input


def measure_table(model: nn.Module, layers: Sequence[PlannedLayer], example_inputs: Any,
                  example_batch: int, settings: LatencySettings) -> LatencyTable:
    """Time (or read from the cache) every layer of ``layers`` with MAC-reducing ranks and
    the whole dense ``model`` at ``settings.batch`` (default ``example_batch``)."""
    from tqdm.auto import tqdm

    from ..runtime import allocator

    batch = settings.batch or example_batch
    weight = next((p for p in model.parameters()), None)
    device = str(weight.device) if weight is not None else "cpu"
    cache = LatencyCache(machine_key(device, timer_name(settings.timer)), settings.cache)
    todo = [(l, ranks) for l in layers if (ranks := timing_ranks(l))]
    inputs = tuple(to_layout(x, settings.layout) for x in batched_inputs(example_inputs, batch))
    dense, fused = _fused_copy(model)
    dense = prepared(dense, settings.layout)
    model_job = TimingJob("", DENSE, None, dense, inputs)
    seen = _layer_inputs(dense, [l.name for l, _ in todo], inputs)
    keys_of: dict[str, tuple[str, ...]] = {}
    tables: dict[tuple[str, ...], list[float]] = {}  # per key set: dense ms, then per rank
    fresh: dict[tuple[str, ...], tuple[float, list[float]]] = {}  # (its model ms, raw ms)
    try:
        for l, ranks in tqdm(todo, desc="timing layers", disable=None):
            runtime = _runtime_module(dense, l, settings.layout)
            where = seen.get(l.name) or _traced_input(l, example_batch, batch, settings.layout)
            keys = keys_of[l.name] = tuple([_entry(l, runtime, where, settings.layout, DENSE, None)] + [
                _entry(l, runtime, where, settings.layout, l.method, r) for r, _ in ranks])
            cached = [cache.get(k) for k in keys]
            if keys in tables or keys in fresh:  # a layer like one already timed (VGG's repeats)
                continue
            if all(m is not None for m in cached):
                tables[keys] = cached
            else:
                ms = run_timer(settings.timer, [model_job] + _layer_jobs(l, runtime, ranks, where, settings.layout))
                fresh[keys] = (ms[0], ms[1:])
        key = _model_key(model, inputs, fused, settings.layout)
        model_ms = _model_ms(key, settings, cache, model_job, [m for m, _ in fresh.values()])
        for keys, (own, ms) in fresh.items():  # each fresh table on the median model's scale
            tables[keys] = [m * model_ms / own for m in ms]
            for k, m in zip(keys, tables[keys]):
                cache.put(k, m)
    finally:
        cache.save()
    if allocator() == "system" and device == "cpu" and isinstance(settings.timer, InterleavedTimer):
        warnings.warn(f"latency plan timed on the system allocator: {SYSTEM_MALLOC}", RuntimeWarning, stacklevel=4)
    table = {}
    for l, ranks in todo:
        ms = tables[keys_of[l.name]]
        per_rank = tuple((r, m * l.calls, macs) for (r, macs), m in zip(ranks, ms[1:]))
        table[l.name] = LayerTimes(ms[0] * l.calls, per_rank)
    verify = _Verifier(dense, model_job, {l.name: l for l, _ in todo}, settings, cache, key)
    return LatencyTable(batch, settings.layout, torch.get_num_threads(), allocator(), fused, model_ms, table,
                        verify=verify)


class _Verifier:
    """``verify(chosen)``: the fused dense model with the chosen layers replaced by
    factorized ones (random factors, as timed), timed against the dense model in
    interleaved rounds: compressed time / dense time (cached per plan)."""

    def __init__(self, dense: nn.Module, dense_job: TimingJob, layers: dict[str, PlannedLayer],
                 settings: LatencySettings, cache: LatencyCache, model_key: str) -> None:
        self.dense, self.dense_job, self.layers = dense, dense_job, layers
        self.settings, self.cache, self.model_key = settings, cache, model_key

    def __call__(self, chosen: Any) -> float:
        from ..surgery import replace_modules

        ranks = {n: r for n, r in chosen.items() if n in self.layers and not isinstance(r, str) and r is not None}
        if not ranks:
            return 1.0
        key = f"verify|{self.model_key}|{json.dumps(sorted(ranks.items()))}"
        if self.cache.get(key) is not None:
            return self.cache.get(key)
        comp = copy.deepcopy(self.dense)
        mods = dict(comp.named_modules())
        replace_modules(comp, {mods[n]: prepared(self.layers[n].cls.like(mods[n], r, **self.layers[n].options),
                                                 self.settings.layout) for n, r in ranks.items()})
        jobs = [self.dense_job, TimingJob("", "plan", dict(ranks), comp, self.dense_job.inputs)]
        dense_ms, comp_ms = run_timer(self.settings.timer, jobs)
        self.cache.put(key, comp_ms / dense_ms)
        self.cache.save()
        return comp_ms / dense_ms


def _layer_jobs(l: PlannedLayer, runtime: nn.Module, ranks: list[tuple[Any, int]], where: Where,
                layout: str) -> list[TimingJob]:
    """The dense layer and one factorized layer per rank, on one input like ``where``."""
    x = _input_like(where, runtime.weight)
    jobs = [TimingJob(l.name, DENSE, None, runtime, (x,))]
    jobs += [TimingJob(l.name, l.method, r, prepared(l.cls.like(runtime, r, **l.options), layout), (x,))
             for r, _ in ranks]
    return jobs


def _model_key(model: nn.Module, inputs: tuple[Any, ...], fused: bool, layout: str) -> str:
    """The cache key of the whole model: its class and structure (repr), inputs, layout,
    dtype and whether it was fused."""
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
    dtype = next((str(p.dtype) for p in model.parameters()), "")
    arch = hashlib.sha1(repr(model).encode()).hexdigest()[:16]
    return (f"model|{type(model).__module__}.{type(model).__qualname__}|{arch}|in={shapes}|"
            f"{layout}|{dtype}|fused={fused}")


def _model_ms(key: str, settings: LatencySettings, cache: LatencyCache, job: TimingJob,
              fresh: list[float]) -> float:
    """The whole dense model's ms: the median of its times in the fresh layer tables, else
    the cached one, else timed alone."""
    ms = statistics.median(fresh) if fresh else cache.get(key)
    if ms is None:
        ms = run_timer(settings.timer, [job])[0]
    cache.put(key, ms)
    return ms


def _layer_inputs(model: nn.Module, names: Sequence[str], inputs: tuple[Any, ...]) -> dict[str, Where]:
    """(shape, strides) of the first input each named module gets in one forward of ``model``."""
    seen: dict[str, Where] = {}
    mods = dict(model.named_modules())

    def hook(name: str):
        def _h(mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(name, (tuple(args[0].shape), tuple(args[0].stride())))
        return _h

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names if n in mods]
    try:
        with torch.inference_mode():
            model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
        raise ValueError(f"latency_batch={batch}: the fused model fails on the example inputs repeated to "
                         f"{batch} rows ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); give "
                         f"example inputs with that batch, or another latency_batch") from e
    finally:
        for h in handles:
            h.remove()
    return seen


def _traced_input(l: PlannedLayer, example_batch: int, batch: int, layout: str) -> Where:
    """(shape, strides) from the traced shape when the fused model did not show the input."""
    shape = batched_shape(l.in_shape, example_batch, batch)
    return shape, tuple(to_layout(torch.empty(shape, device="meta"), layout).stride())


def _runtime_module(dense: nn.Module, l: PlannedLayer, layout: str) -> nn.Module:
    """The layer as the fused dense model runs it (else a prepared copy of the original)."""
    try:
        m = dense.get_submodule(l.name)
    except AttributeError:
        m = None
    return m if type(m) is type(l.module) else prepared(copy.deepcopy(l.module), layout)


def _input_like(where: Where, weight: torch.Tensor) -> torch.Tensor:
    """A random tensor with the given shape and strides (contiguous when they overlap)."""
    shape, stride = where
    g = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=g).to(weight.device, weight.dtype)
    if any(st == 0 and n > 1 for n, st in zip(shape, stride)):
        return values
    x = torch.empty_strided(shape, stride, dtype=weight.dtype, device=weight.device)
    return x.copy_(values)


def _fused_copy(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy of ``model`` with its BatchNorms folded (:func:`tensorslim.fuse`), as
    a compressed model runs when fused; the unfused copy when fusion refuses the model."""
    from ..fusion import fuse

    dense = copy.deepcopy(model).eval()
    try:
        return fuse(dense), True
    except (ValueError, TypeError, NotImplementedError):
        return dense, False


def _entry(l: PlannedLayer, runtime: nn.Module, where: Where, layout: str, method: str, rank: Any) -> str:
    """The cache key of one timed layer: type and geometry (with the bias a fold may add),
    input shape and strides, layout, dtype, method, rank and options."""
    opts = json.dumps(l.options, sort_keys=True, default=str) if method != DENSE else ""
    return (f"{type(runtime).__name__}({runtime.extra_repr()})|in={list(where[0])}|strides={list(where[1])}|"
            f"{layout}|{runtime.weight.dtype}|{method}|{json.dumps(rank)}|{opts}")


def batched_shape(shape: tuple[int, ...], example_batch: int, batch: int) -> tuple[int, ...]:
    """A traced input shape at ``batch``: the leading dim scaled by batch / example_batch
    when it holds the batch (or a multiple of it, e.g. batch x time folded), else kept."""
    if not shape or example_batch < 1 or shape[0] % example_batch:
        return tuple(shape)
    return (shape[0] // example_batch * batch, *shape[1:])


def batched_inputs(example_inputs: Any, batch: int) -> tuple[Any, ...]:
    """The example inputs with ``batch`` rows (rows repeated cyclically; non-tensors as is)."""
    out = []
    for x in as_tuple(example_inputs):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != batch:
            x = x[torch.arange(batch, device=x.device) % x.shape[0]]
        out.append(x)
    return tuple(out)


def to_layout(x: Any, layout: str) -> Any:
    """``x`` channels-last (4-d / 5-d tensors) for ``layout="channels_last"``, else as is."""
    if layout != "channels_last" or not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def prepared(module: nn.Module, layout: str) -> nn.Module:
    """``module`` in eval mode without gradients; for ``channels_last`` its 4-d (5-d)
    parameters and buffers channels-last (-3d), as ``Module.to(memory_format=...)`` does."""
    module = module.eval().requires_grad_(False)
    if layout == "channels_last":
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.dim() in (4, 5):
                    t.data = t.data.contiguous(memory_format=torch.channels_last if t.dim() == 4
                                               else torch.channels_last_3d)
    return module

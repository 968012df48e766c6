"""Counting parameters and multiply-accumulates (MACs) of a model from traced shapes, and
measuring latency.

MACs are counted for convolutions, transposed convolutions and Linear layers (the ops that
dominate cost and that ``torch.utils.flop_counter.FlopCounterMode`` counts as 2 FLOPs per MAC);
factorized layers count as the sum of their parts. Norms, activations and pooling are not
counted. A Parameter shared by several modules (tied weights) counts once.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from math import prod
from typing import Any, Iterator, Sequence

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COUNTED = _CONV + _CONV_T + (nn.Linear,)  # the dense module types count() reports


def _is_factorized(module: nn.Module) -> bool:
    from .layers.base import FactorizedLayer

    return isinstance(module, FactorizedLayer)


def primitive_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """MACs of one call of a primitive module given its input/output tensors (with batch)."""
    if isinstance(module, _CONV):
        per_out = (module.in_channels // module.groups) * prod(module.kernel_size)
        return out.numel() * per_out
    if isinstance(module, _CONV_T):  # every input value meets C_out/g * prod(k) weights
        return inp.numel() * (module.out_channels // module.groups) * prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    custom = getattr(module, "macs", None)
    if callable(custom) and _is_factorized(module) and not any(
        isinstance(m, COUNTED) for m in module.modules()
    ):
        return int(custom(tuple(inp.shape)))
    own = getattr(module, "own_macs", None)  # MACs a factorized layer computes outside its children
    if callable(own) and _is_factorized(module):
        return int(own(tuple(inp.shape), tuple(out.shape))) or None
    return None


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of positional args)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a torch.Tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


@dataclass(frozen=True)
class LayerCost:
    """Cost of one counted layer (a conv, a transposed conv, a Linear, or a factorized layer
    as a whole). ``params`` leaves out Parameters already counted in an earlier row (a weight
    tied to another layer's counts once, in the first layer that holds it)."""

    name: str
    type: str
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class CostReport:
    """Per-layer and total cost; ``macs`` are for the example inputs as given (with batch)."""

    layers: tuple[LayerCost, ...]
    total_params: int
    total_macs: int
    batch_size: int = 1

    def __getitem__(self, name: str) -> LayerCost:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no counted layer named {name!r}; counted: {[l.name for l in self.layers]}")

    def __iter__(self) -> Iterator[LayerCost]:
        return iter(self.layers)

    def table(self) -> str:
        rows = [f"{'layer':40s} {'type':16s} {'params':>12s} {'MACs':>14s}"]
        for l in self.layers:
            rows.append(f"{l.name:40s} {l.type:16s} {l.params:12,d} {l.macs:14,d}")
        rows.append(f"{'total':40s} {'':16s} {self.total_params:12,d} {self.total_macs:14,d}")
        return "\n".join(rows)


def _counted_units(model: nn.Module) -> dict[str, nn.Module]:
    """Modules reported as one row: factorized layers whole, other (transposed) convs/linears."""
    units: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if _is_factorized(mod):
            units[name] = mod
            skip.append(name)
        elif isinstance(mod, COUNTED):
            units[name] = mod
    return units


def count(model: nn.Module, example_inputs: Any) -> CostReport:
    """Count params and MACs per layer by running ``model`` once on ``example_inputs``.

    A module called several times accumulates its MACs. ``total_params`` counts every
    Parameter once, even one shared by several modules. Returns a :class:`CostReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count expects an nn.Module, got {type(model).__name__}")
    inputs = as_tuple(example_inputs)
    units = _counted_units(model)
    owner = {}  # primitive module -> unit name
    for uname, unit in units.items():
        for mod in unit.modules():
            owner[mod] = uname
    macs = {n: 0 for n in units}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        m = primitive_macs(mod, args[0], out)
        if m is not None:
            macs[owner[mod]] += m

    def unit_hook(name: str):
        def _h(mod: nn.Module, args: tuple, out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))

        return _h

    handles = [m.register_forward_hook(hook) for m in owner]
    handles += [u.register_forward_hook(unit_hook(n)) for n, u in units.items()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    layers, seen = [], set()
    for name, unit in units.items():
        ins, outs = shapes.get(name, ((), ()))
        own = [p for p in unit.parameters() if id(p) not in seen]  # a tied weight counts once
        seen.update(id(p) for p in own)
        params = sum(p.numel() for p in own)
        layers.append(LayerCost(name, type(unit).__name__, params, macs[name], ins, outs))
    batch = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
    total_params = sum(p.numel() for p in model.parameters())
    return CostReport(tuple(layers), total_params, sum(macs.values()), batch)


@dataclass(frozen=True)
class Latency:
    """Latency of repeated forward calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    times_ms: tuple[float, ...] = field(repr=False)
    threads: int
    batch_size: int
    allocator: str = "system"  # the process's malloc (tensorslim.runtime.allocator)


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
) -> Latency:
    """Median wall time of ``model(*example_inputs)`` under ``torch.inference_mode``.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (restored afterwards).
    The result records the thread count and the memory allocator the process runs on
    (``tcmalloc`` / ``jemalloc`` / ``system``), which change CPU latencies.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    inputs = as_tuple(example_inputs)
    old = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        times = _time_calls(model, inputs, repeats, warmup)
    finally:
        torch.set_num_threads(old)
        model.train(was_training)
    times_sorted = sorted(times)
    q = lambda f: times_sorted[min(len(times_sorted) - 1, int(f * len(times_sorted)))]  # noqa: E731
    batch = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
    used = threads if threads is not None else old
    from .runtime import allocator

    return Latency(statistics.median(times), q(0.1), q(0.9), tuple(times), used, batch, allocator())


def _time_calls(model: nn.Module, inputs: Sequence[Any], repeats: int, warmup: int) -> list[float]:
    sync = torch.cuda.synchronize if any(
        isinstance(x, torch.Tensor) and x.is_cuda for x in inputs
    ) else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(*inputs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times

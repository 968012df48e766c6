"""Counting parameters and multiply-accumulates (MACs) of a model from traced shapes, and
measuring latency.

MACs are counted for convolutions, transposed convolutions and Linear layers (the ops that
dominate cost and that ``torch.utils.flop_counter.FlopCounterMode`` counts as 2 FLOPs per MAC);
factorized layers count as the sum of their parts. ``nn.Embedding`` tables get a row with their
parameters and no MACs (a lookup multiplies nothing), so the rows of a transformer add up to
its whole size. Norms, activations and pooling are not counted. A Parameter shared by several
modules (tied weights) counts once.

``example_inputs`` is a tensor (``model(x)``), a tuple / list of positional inputs
(``model(*x)``) or a mapping of keyword inputs (``model(**x)``, a tokenizer's output).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from math import prod
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COUNTED = _CONV + _CONV_T + (nn.Linear,)  # the dense module types whose MACs count() reports
PARAMS_ONLY = (nn.Embedding,)  # reported with their parameters, no MACs


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


class KeywordInputs(tuple):
    """Keyword example inputs: a tuple of the values (so ``inputs[0]`` is the first tensor)
    that remembers their names; :func:`call` passes them as ``model(**mapping)``."""

    names: tuple[str, ...]

    def __new__(cls, mapping: Mapping[str, Any]) -> "KeywordInputs":
        self = super().__new__(cls, tuple(mapping.values()))
        self.names = tuple(mapping)
        return self

    def mapping(self) -> dict[str, Any]:
        return dict(zip(self.names, self))


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise ``example_inputs``: a tensor, a tuple/list of positional args, or a mapping of
    keyword args (returned as :class:`KeywordInputs`; run it with :func:`call`)."""
    if isinstance(example_inputs, KeywordInputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        if not example_inputs or not all(isinstance(k, str) for k in example_inputs):
            raise ValueError("example_inputs: a mapping of keyword inputs needs at least one entry and "
                             f"string keys, got keys {list(example_inputs)[:5]}")
        return KeywordInputs(example_inputs)
    raise TypeError(
        f"example_inputs must be a torch.Tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def call(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``model`` on normalised inputs (:func:`as_tuple`): ``model(**d)`` for keyword inputs,
    else ``model(*inputs)``."""
    if isinstance(inputs, KeywordInputs):
        return model(**inputs.mapping())
    return model(*inputs)


def batch_size(inputs: tuple[Any, ...]) -> int:
    """The leading dimension of the first tensor among ``inputs`` (1 when there is none)."""
    first = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


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
    """Modules reported as one row: factorized layers whole, other (transposed) convs/linears,
    embedding tables."""
    units: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if _is_factorized(mod):
            units[name] = mod
            skip.append(name)
        elif isinstance(mod, COUNTED + PARAMS_ONLY):
            units[name] = mod
    return units


def count(model: nn.Module, example_inputs: Any) -> CostReport:
    """Count params and MACs per layer by running ``model`` once on ``example_inputs`` (a
    tensor, a tuple of positional inputs or a dict of keyword inputs).

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
            call(model, inputs)
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
    total_params = sum(p.numel() for p in model.parameters())
    return CostReport(tuple(layers), total_params, sum(macs.values()), batch_size(inputs))


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
    """Median wall time of ``model`` on ``example_inputs`` (as :func:`count` takes them) under
    ``torch.inference_mode``.

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
    batch = batch_size(inputs)
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
            call(model, inputs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times

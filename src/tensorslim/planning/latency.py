"""Latency-aware planning (``make_plan(..., target_latency=...)``): the settings, the ranks to
time, the measured table the rank rules read, and the plan's latency record.

Per compressible layer a bounded set of ranks is timed (:func:`timing_ranks`: one near each
MAC fraction of :data:`FRACTIONS`, preferring ranks whose channel counts are multiples of the
CPU's channel block, 8 or 16, the blocks oneDNN's kernels work in), with the dense layer and
the whole dense model, on this machine at the user's batch size and layout
(:mod:`.latency_measure`; cached on disk by :mod:`.latency_cache`). What the timed layers do
not take of the model's time is its fixed rest. A rank is a candidate only when it is clearly
faster than dense (:data:`MIN_GAIN`) and no more accurate rank is about as fast
(:data:`TOLERANCE`), so a plan never predicts a model slower than dense. The chosen plan is
then checked on the whole model (:func:`verified_choice`): a model measured slower than
predicted corrects the table, and one measured no faster than dense stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from .candidates import PlannedLayer, rank_candidates
from .latency_cache import channel_block
from .latency_timer import InterleavedTimer, Timer

LAYOUTS = ("channels_last", "nchw")
LATENCY_OPTIONS = ("latency_batch", "layout", "latency_timer", "latency_cache")
# MAC fractions (of the dense layer) near which a candidate rank is timed
FRACTIONS = (0.06, 0.12, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8)
# why a plan timed on glibc's malloc predicts factorized layers too fast (see tensorslim.runtime)
SYSTEM_MALLOC = ("inside a model a factorized layer's buffers fault in fresh pages on every call, alone "
                 "they do not, so its predicted time is optimistic; run under TCMalloc (the tensorslim "
                 "command does by default; from Python: tensorslim.runtime.relaunch)")
MIN_GAIN = 0.10  # a rank is chosen only if it is at least this much faster than dense
TOLERANCE = 0.03  # a rank within this of a more accurate rank's time is not faster than it
MAX_CORRECTIONS = 2  # whole-model checks that may correct the table and choose again
WINDOW = 0.4  # a rank within this relative distance of a fraction's MACs may stand for it


@dataclass(frozen=True)
class LatencySettings:
    """How to measure: batch (None: the example inputs'), layout, timer, whether to cache."""

    batch: int | None = None
    layout: str = "channels_last"
    timer: Timer = field(default_factory=InterleavedTimer)
    cache: bool = True


def latency_settings(goal: Mapping[str, Any]) -> LatencySettings | None:
    """The settings of a make_plan goal with ``target_latency`` (None without it).
    ValueError naming the argument for a bad value, or for a latency option without
    ``target_latency``."""
    given = [k for k in LATENCY_OPTIONS if goal.get(k) is not None]
    if goal.get("target_latency") is None:
        if given:
            raise ValueError(f"{', '.join(g + '=' for g in given)} only take effect with target_latency= "
                             f"(a latency goal)")
        return None
    batch, layout = goal.get("latency_batch"), goal.get("layout") or "channels_last"
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"latency_batch must be an int >= 1 (the batch size to time at), got {batch!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    timer = goal.get("latency_timer") or InterleavedTimer()
    if not callable(timer):
        raise TypeError(f"latency_timer must be a callable(jobs) -> [ms per job], got {type(timer).__name__}")
    cache = goal.get("latency_cache", True)
    if not isinstance(cache, bool):
        raise ValueError(f"latency_cache must be True or False, got {cache!r}")
    return LatencySettings(batch, layout, timer, cache)


@dataclass(frozen=True)
class LayerTimes:
    """One layer's measured ms per forward of the model (per call x calls): dense, and per
    timed rank ``(rank, ms, MACs)``."""

    dense_ms: float
    measured: tuple[tuple[Any, float, int], ...]

    def ms_of(self, rank: Any) -> float:
        return next(ms for r, ms, _ in self.measured if r == rank)

    def faster(self) -> list[tuple[Any, float]]:
        """``(rank, ms)`` of the ranks worth choosing, ascending in ms: at least
        :data:`MIN_GAIN` faster than dense, and not dominated, i.e. no rank with more MACs
        (more accurate) is within :data:`TOLERANCE` of its time (a difference the clock
        cannot resolve is not worth accuracy)."""
        fast = [t for t in self.measured if t[1] <= (1 - MIN_GAIN) * self.dense_ms]
        keep = [a for a in fast if not any(b[2] > a[2] and b[1] <= a[1] * (1 + TOLERANCE) for b in fast)]
        return [(r, ms) for r, ms, _ in sorted(keep, key=lambda t: (t[1], -t[2]))]


@dataclass(frozen=True)
class LatencyTable:
    """The measured table of a plan: whole dense model time and the timed layers."""

    batch: int
    layout: str
    threads: int
    allocator: str
    fused: bool
    model_ms: float
    layers: Mapping[str, LayerTimes]
    correction: float = 1.0  # factor applied to the factorized times after a whole-model check
    measured_ratio: float | None = None  # the chosen plan's whole-model time / dense, measured
    # verify(chosen) -> measured (compressed model time / dense model time), None: no check
    verify: Callable[[Mapping[str, Any]], float] | None = field(default=None, compare=False, repr=False)

    @property
    def rest_ms(self) -> float:
        """The time of everything but the timed layers: the measured model minus the timed
        dense layers (negative when layers timed alone are slower than inside the model; a
        prediction then still subtracts exactly the measured savings)."""
        return self.model_ms - sum(t.dense_ms for t in self.layers.values())

    @property
    def total_ms(self) -> float:
        """The dense model's measured time."""
        return self.model_ms

    def dense_ms(self, name: str) -> float:
        """A timed layer's dense ms; 0 for an untimed one (its time is in the rest)."""
        return self.layers[name].dense_ms if name in self.layers else 0.0

    def candidates(self, name: str) -> list[tuple[Any, float]]:
        return self.layers[name].faster() if name in self.layers else []

    def best_ratio(self) -> float:
        """The fastest choice's predicted time over the dense model's (each layer at its
        fastest rank worth choosing, or dense)."""
        fastest = sum(min([t.dense_ms] + [ms for _, ms in t.faster()]) for t in self.layers.values())
        return (self.rest_ms + fastest) / self.total_ms if self.total_ms else 1.0

    def predicted_ms(self, chosen: Mapping[str, Any]) -> float:
        """The model's predicted time with ``chosen`` (layer -> rank, or a reason: dense)."""
        return self.rest_ms + sum(t.dense_ms if _dense(chosen.get(n)) else t.ms_of(chosen[n])
                                  for n, t in self.layers.items())

    def correction_for(self, chosen: Mapping[str, Any], measured_ratio: float) -> float:
        """The factor (in [1, 10]) on the chosen factorized layers' times that makes the
        prediction match the measured whole-model ratio (1: measured as fast as predicted)."""
        fact = sum(t.ms_of(chosen[n]) for n, t in self.layers.items() if not _dense(chosen.get(n)))
        unchanged = self.total_ms - sum(t.dense_ms for n, t in self.layers.items() if not _dense(chosen.get(n)))
        if fact <= 0:
            return 1.0
        return max(1.0, min(10.0, (measured_ratio * self.total_ms - unchanged) / fact))

    def scaled(self, k: float) -> "LatencyTable":
        """This table with every factorized time multiplied by ``k``."""
        layers = {n: replace(t, measured=tuple((r, ms * k, m) for r, ms, m in t.measured))
                  for n, t in self.layers.items()}
        return replace(self, layers=layers, correction=self.correction * k)

    def dense_reason(self, name: str) -> str:
        """Why a layer without a faster candidate stays dense (one line)."""
        t = self.layers.get(name)
        if t is None or not t.measured:
            return "kept dense: no rank of this method reduces its cost"
        best = min(ms for _, ms, _ in t.measured) / t.dense_ms
        what = "every factorized rank is slower" if best >= 1 else \
            f"no factorized rank is {MIN_GAIN:.0%} faster"
        return f"kept dense: {what} at batch {self.batch} (best {best:.2f}x dense time)"


def timing_ranks(layer: PlannedLayer, fractions: Sequence[float] = FRACTIONS) -> list[tuple[Any, int]]:
    """``(rank, MACs)`` of the ranks to time for ``layer``: per fraction, among the
    MAC-reducing ranks within :data:`WINDOW` of that fraction of the dense MACs (else the
    nearest), the best aligned to the channel block, then the nearest; no duplicates."""
    cands = rank_candidates(layer, "macs")
    if not cands:
        return []
    block = channel_block()
    out: dict[Any, int] = {}
    for f in fractions:
        goal = f * layer.macs
        pool = [c for c in cands if abs(c[1][1] - goal) <= WINDOW * goal]
        pool = pool or [min(cands, key=lambda c: abs(c[1][1] - goal))]
        r, (_, macs) = max(pool, key=lambda c: (alignment(layer, c[0], block), -abs(c[1][1] - goal)))
        out.setdefault(r, macs)
    return list(out.items())


def alignment(layer: PlannedLayer, rank: Any, block: int) -> int:
    """2 when every channel count of ``rank`` is a multiple of ``block`` (or the dense
    layer's own channel count), 1 of ``block // 2``, else 0."""
    parts = rank if isinstance(rank, (tuple, list)) else (rank,)
    mod = layer.module
    full = {getattr(mod, a, None) for a in ("in_channels", "out_channels", "in_features", "out_features")}
    for level, b in ((2, block), (1, max(1, block // 2))):
        if all(p % b == 0 or p in full for p in parts):
            return level
    return 0


def verified_choice(rule: Any, layers: Sequence[PlannedLayer], ctx: Any, chosen: dict[str, Any],
                    notes: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], Any]:
    """Check a latency plan on the whole model: ``(chosen, notes, ctx)`` after measuring the
    compressed model (factors random, as timed) against the dense one in interleaved rounds.

    Layers timed alone can be faster than inside the model (their data stay in cache; other
    processes share the memory bus). When the measured ratio is above the prediction, the
    factorized times are corrected by the factor that explains it and the rule chooses again
    (at most :data:`MAX_CORRECTIONS` times). A plan still measured no faster than dense keeps
    every layer dense, with the measured ratio as the reason."""
    table = ctx.latency
    if table is None or table.verify is None:
        return chosen, notes, ctx
    measured = table.verify(chosen)
    for _ in range(MAX_CORRECTIONS):
        k = table.correction_for(chosen, measured)
        if k <= 1 + TOLERANCE:
            break
        table = table.scaled(k)
        ctx = replace(ctx, latency=table)
        chosen, notes = rule.choose(layers, ctx)
        measured = table.verify(chosen)
    if measured >= 1.0 and not all(_dense(r) for r in chosen.values()):
        why = (f"kept dense: the compressed model measured {measured:.3f}x the dense model's time "
               f"at batch {table.batch}")
        chosen, notes, measured = {n: why if not _dense(r) else r for n, r in chosen.items()}, {}, 1.0
    table = replace(table, measured_ratio=measured)
    return chosen, notes, replace(ctx, latency=table)


def latency_record(table: LatencyTable, chosen: Mapping[str, Any], target: float) -> dict[str, Any]:
    """The plan's ``goal["latency"]``: how it was measured, the dense model's measured time,
    the predicted time of the chosen ranks, the whole-model check (``measured_ratio``, and
    the ``correction`` it applied to the factorized times), and per timed layer its dense and
    chosen ms and every timed ``(rank, ms)`` (corrected). ``note`` says when ``target`` was
    unreachable (neither predicted nor measured)."""
    from ..plan import freeze
    from .rule_base import jsonable

    layers = {}
    for name, t in table.layers.items():
        ms = t.dense_ms if _dense(chosen.get(name)) else t.ms_of(chosen[name])
        layers[name] = {"dense_ms": _ms(t.dense_ms), "ms": _ms(ms),
                        "measured": [(r, _ms(m)) for r, m, _ in t.measured]}
    predicted = table.predicted_ms(chosen)
    out = {"batch": table.batch, "layout": table.layout, "threads": table.threads,
           "allocator": table.allocator, "fused": table.fused, "dense_ms": _ms(table.model_ms),
           "rest_ms": _ms(table.rest_ms),
           "predicted_ms": _ms(predicted), "predicted_ratio": round(predicted / table.total_ms, 4),
           "best_ratio": round(table.best_ratio(), 4), "correction": round(table.correction, 4),
           "measured_ratio": None if table.measured_ratio is None else round(table.measured_ratio, 4),
           "layers": layers}
    met = table.measured_ratio is not None and table.measured_ratio <= target  # the check says it is met
    if table.best_ratio() > target * (1 + 1e-9) and not met:
        out["note"] = unreachable_note(table, target)
    return freeze(jsonable(out))


def unreachable_note(table: LatencyTable, target: float) -> str:
    """One line: the latency target cannot be met here; what the plan does instead."""
    best, threads = table.best_ratio(), f"{table.threads} thread{'s' if table.threads != 1 else ''}"
    return (f"target_latency={target:g} is unreachable at batch {table.batch} ({table.layout}, {threads}): "
            f"the fastest measured choice keeps {best:.3f} of the dense model's {table.total_ms:.3f} ms "
            f"(best reachable target_latency={best:.3f}); the plan uses it")


def _dense(rank: Any) -> bool:
    """A choice that keeps the layer dense (no rank, or the reason why)."""
    return rank is None or isinstance(rank, str)


def _ms(v: float) -> float:
    return round(float(v), 5)

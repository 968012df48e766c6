"""Timing jobs and the default timer of latency-aware planning.

A timer is any callable ``timer(jobs) -> [ms per call, one per job]``. The default,
:class:`InterleavedTimer`, runs all jobs of one table in the same process, alternating them
round by round (forward, then backward order) and takes the median per job, so a background
load that comes and goes on a shared machine hits every job alike. Tests inject a stub that
returns fixed numbers per ``(job.layer, job.method, job.rank)``.

Clock: with one torch thread on the CPU the default timer reads the thread's CPU time, which
equals the wall time of a compute-bound call on an idle core but leaves out the time the
scheduler gives other processes; on a loaded machine a long call (a whole model) is
preempted far more often than a short one (one layer), so wall-clock medians would inflate
the model's fixed rest. With several threads (or on a GPU) it reads the wall clock.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..configs import check_int

DENSE = "dense"  # job.method of a dense layer or of the whole dense model
CLOCKS = ("auto", "cpu", "wall")


@dataclass(frozen=True)
class TimingJob:
    """One thing to time: ``module(*inputs)``, prepared in the plan's layout and eval mode.
    ``layer`` is the layer name ("" for the whole model); ``method`` is ``"dense"`` or the
    factorization; ``rank`` is the candidate rank (None for dense)."""

    layer: str
    method: str
    rank: Any
    module: nn.Module
    inputs: tuple[Any, ...]

    def run(self) -> Any:
        return self.module(*self.inputs)


Timer = Callable[[Sequence[TimingJob]], Sequence[float]]


def timer_name(timer: Timer) -> str:
    """The name a timer's measurements are cached under (part of the machine key)."""
    return str(getattr(timer, "name", None) or
               f"{getattr(timer, '__module__', '?')}.{getattr(timer, '__qualname__', type(timer).__qualname__)}")


class InterleavedTimer:
    """Median over ``rounds`` interleaved rounds of each job's time per call, after
    ``warmup`` calls each. A job faster than ``sample_ms`` is called several times per round
    (so the clock's resolution and Python's overhead do not dominate); when one round of all
    jobs takes long, fewer rounds are run (at least ``min_rounds``) so a table stays within
    about ``budget_s`` seconds."""

    def __init__(self, rounds: int = 15, warmup: int = 2, sample_ms: float = 1.0, min_rounds: int = 3,
                 budget_s: float = 2.0, max_reps: int = 200, clock: str = "auto") -> None:
        for what, v, low in (("rounds", rounds, 1), ("warmup", warmup, 0), ("min_rounds", min_rounds, 1),
                             ("max_reps", max_reps, 1)):
            check_int(what, v, low, where="InterleavedTimer")
        self.rounds, self.warmup, self.sample_ms = rounds, warmup, float(sample_ms)
        self.min_rounds, self.budget_s, self.max_reps = min(min_rounds, rounds), float(budget_s), max_reps
        if clock not in CLOCKS:
            raise ValueError(f"InterleavedTimer: clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.clock = clock

    @property
    def name(self) -> str:
        """``interleaved-median-cpu`` or ``-wall``: the clock this process would read now."""
        return f"interleaved-median-{self._clock(False)}"

    def _clock(self, cuda: bool) -> str:
        if self.clock != "auto":
            return self.clock
        return "cpu" if torch.get_num_threads() == 1 and not cuda else "wall"

    def __call__(self, jobs: Sequence[TimingJob]) -> list[float]:
        sync = _sync_for(jobs)
        now = time.thread_time if self._clock(sync is not _no_sync) == "cpu" else time.perf_counter
        with torch.inference_mode():
            first = []
            for j in jobs:
                for _ in range(self.warmup):
                    j.run()
                first.append(_seconds(j, 1, sync, now))  # also the last warm-up call
            reps = [max(1, min(self.max_reps, math.ceil(self.sample_ms / 1e3 / max(t, 1e-7)))) for t in first]
            per_round = sum(t * r for t, r in zip(first, reps))
            rounds = max(self.min_rounds, min(self.rounds, int(self.budget_s / max(per_round, 1e-9))))
            times: list[list[float]] = [[] for _ in jobs]
            order = list(range(len(jobs)))
            for r in range(rounds):
                for i in order if r % 2 == 0 else order[::-1]:
                    times[i].append(_seconds(jobs[i], reps[i], sync, now) * 1e3 / reps[i])
        return [statistics.median(t) for t in times]


def _seconds(job: TimingJob, reps: int, sync: Callable[[], None], now: Callable[[], float]) -> float:
    sync()
    t0 = now()
    for _ in range(reps):
        job.run()
    sync()
    return now() - t0


def _no_sync() -> None:
    return None


def _sync_for(jobs: Sequence[TimingJob]) -> Callable[[], None]:
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for j in jobs for x in j.inputs)
    return torch.cuda.synchronize if cuda else _no_sync


def run_timer(timer: Timer, jobs: Sequence[TimingJob]) -> list[float]:
    """``timer(jobs)`` checked: one finite positive number of ms per job, else ValueError
    naming the timer."""
    out = list(timer(jobs))
    bad = [x for x in out if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0]
    if len(out) != len(jobs) or bad:
        raise ValueError(f"latency_timer {timer_name(timer)} must return one finite time in ms > 0 per job "
                         f"({len(jobs)} jobs), got {out!r:.200}")
    return [float(x) for x in out]

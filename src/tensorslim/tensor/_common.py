"""Shared validation and small helpers of the tensor package (not public API)."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

# CP ranks above this multiple of the largest dimension are refused before anything is allocated
CP_RANK_FACTOR = 10
# Environment variable: intra-op threads for small decompositions (default 1; 0 = leave as is)
SMALL_LINALG_THREADS_ENV = "TENSORSLIM_SMALL_LINALG_THREADS"
# Largest-op size (multiply-adds) from which a decomposition keeps the caller's thread count.
# Below it a single LAPACK call is short single-threaded, and on a shared machine two threads
# lose more waiting for a descheduled worker than they can gain when idle; above it threads
# may pay off on an idle machine (benchmarks/bench_contention.py measures both).
SMALL_LINALG_WORK = 2**30

def check_tensor(t: object, name: str, *, min_dim: int = 0, floating: bool = True,
                 finite: bool = False) -> torch.Tensor:
    """Return ``t`` if it is a torch tensor with at least ``min_dim`` dims (and, with
    ``finite=True``, no NaN/Inf entries: see :func:`check_finite`), else raise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}"
        )
    if floating and t.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name} must be a float32 or float64 tensor, got dtype {t.dtype}; "
            "convert it with .float() or .double()"
        )
    if finite:
        check_finite(t, name)
    return t


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``t`` if every entry is finite, else raise a ValueError naming ``name``, the
    numbers of NaN and Inf entries and the shape. Every decomposition calls this (through
    ``check_tensor(..., finite=True)``): LAPACK on non-finite input fails with an unrelated
    convergence error or silently returns NaN factors."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ValueError(f"{name} has non-finite entries ({n_nan} NaN, {n_inf} Inf) in a tensor "
                         f"of shape {tuple(t.shape)}; decompositions accept finite values only")
    return t


def check_rank(value: object, name: str, maximum: int, limit: str) -> int:
    """Return ``value`` as an int in ``[1, maximum]``, checked before anything is allocated;
    ``limit`` says where the maximum comes from (it ends the error message)."""
    rank = check_int(value, name)
    if rank > maximum:
        raise ValueError(f"{name}={rank} exceeds {limit}; accepted: 1 <= {name} <= {maximum}")
    return rank


def check_cp_rank(value: object, shape: Sequence[int], name: str = "rank") -> int:
    """A CP rank: an int in ``[1, CP_RANK_FACTOR * max(shape)]``. CP ranks may exceed every mode
    size, but the factors (I_n, R) and the Khatri-Rao products (prod I_half, R) grow with R, so
    an absurd rank would try to allocate gigabytes before failing."""
    shape = tuple(int(s) for s in shape)
    bound = CP_RANK_FACTOR * max(shape, default=1)
    return check_rank(value, name, bound,
                      f"{CP_RANK_FACTOR}x the largest dimension ({max(shape, default=1)}) of a "
                      f"tensor of shape {shape}, the largest CP rank accepted")


def _small_threads() -> int:
    raw = os.environ.get(SMALL_LINALG_THREADS_ENV, "1").strip()
    if not raw.isdigit():
        raise ValueError(f"{SMALL_LINALG_THREADS_ENV}={raw!r} must be an int >= 0 (the intra-op "
                         "threads for small decompositions; 0 leaves torch's setting alone)")
    return int(raw)


@contextmanager
def small_linalg_threads(work: float, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on few intra-op threads (``$TENSORSLIM_SMALL_LINALG_THREADS``, default 1)
    when it is CPU work whose largest single operation is below ``SMALL_LINALG_WORK``
    multiply-adds (``work``: the caller's estimate); restores the thread count afterwards, also
    on an exception. A decomposition of a small tensor is many short LAPACK / BLAS
    calls: threads do not speed them up, and when another process keeps a core busy every
    parallel region waits for a descheduled worker. Nested uses are cheap (the inner one finds
    the count already low). The thread count is process-wide: threads of one Python process
    that decompose concurrently share it."""
    limit = _small_threads()
    current = torch.get_num_threads()
    if (torch.device(device).type != "cpu" or limit == 0 or current <= limit
            or work >= SMALL_LINALG_WORK):
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(current)


def check_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; known: {', '.join(map(repr, choices))}")
    return str(value)


def make_generator(seed: object) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (random draws happen on CPU, then move)."""
    seed = check_int(seed, "seed", minimum=0)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Signs (+1/-1 per column) that make the largest-|.| entry of each column of ``u`` positive."""
    idx = u.abs().argmax(dim=0)
    s = torch.sign(u.gather(0, idx[None, :])[0])
    return torch.where(s == 0, torch.ones_like(s), s)


def check_mode(mode: object, ndim: int, name: str = "mode") -> int:
    """Return ``mode`` as a non-negative int in ``[0, ndim)`` (negative modes count back)."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"{name} must be an int, got {type(mode).__name__} ({mode!r})")
    if not -ndim <= mode < ndim:
        raise ValueError(f"{name}={mode} is out of range for a tensor with {ndim} dimensions; "
                         f"accepted: {-ndim} <= {name} < {ndim}")
    return mode % ndim




def check_tol(tol: object, name: str = "tol") -> float:
    """Return ``tol`` as a float >= 0."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {tol!r}")
    return float(tol)


def has_converged(prev: float | None, err: float, tol: float, dtype: torch.dtype,
                  noise: float = 0.0) -> bool:
    """Stopping rule of the iterative decompositions: the relative change of the relative
    error is <= ``tol``, or the change of the squared relative error is below
    ``noise * eps(dtype)``, the rounding noise of the error estimate, so that float32 runs do
    not chase noise."""
    if prev is None:
        return False
    eps = torch.finfo(dtype).eps
    return abs(prev - err) <= tol * prev or abs(prev * prev - err * err) <= noise * eps

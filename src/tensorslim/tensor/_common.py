"""Shared validation and small helpers of the tensor package (not public API)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

def check_tensor(t: object, name: str, *, min_dim: int = 0, floating: bool = True) -> torch.Tensor:
    """Return ``t`` if it is a torch tensor with at least ``min_dim`` dims, else raise."""
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
    return t


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

"""Base class and shared validation of the factorized layers.

Every factorized layer is an ``nn.Module`` that RUNS the factorized form in ``forward`` (house
rule 2): it never rebuilds the dense weight. It can be built three ways:

- ``Layer.from_dense(module, rank, **opts)`` (alias of ``from_conv`` / ``from_linear``): decompose
  a trained dense module; sets ``approx_error``.
- ``Layer.like(module, rank, **opts)``: same geometry, random init (to load a compressed
  checkpoint's state_dict, or to train from scratch).
- The constructor, which mirrors the dense module's constructor plus a rank.

``Layer.cost(module, rank, in_shape, out_shape, **opts)`` gives (params, MACs per sample) of the
replacement without building it; it equals what counting the MACs of the built layer's
``nn.Conv*`` / ``nn.Linear`` children with forward hooks gives (TTLinear: its ``macs()``).
"""
import numbers
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

Rank = Union[int, tuple[int, ...]]


class LayerTypeError(TypeError, ValueError):
    """An unsupported dense module type. Both a ``TypeError`` and a ``ValueError``."""


class FactorizedLayer(nn.Module):
    """Base class of the factorized replacements of dense ``nn.Conv*d`` / ``nn.Linear`` layers.

    Attributes:
        method: "cp", "tucker", "svd" or "tt" (class constant).
        dense_types: dense module types this layer replaces (class constant).
        rank: the rank, JSON-able: an int, or a tuple of ints (Tucker: (r_in, r_out); TT:
            internal TT-ranks (r_1, ..., r_{d-1})).
        approx_error: ||W - W^|| / ||W|| of the decomposed weight when built by ``from_dense``,
            else None.
    """

    method: ClassVar[str] = ""
    dense_types: ClassVar[tuple[type, ...]] = ()
    __jit_ignored_attributes__ = ["method", "dense_types"]

    approx_error: Optional[float]

    def __init__(self) -> None:
        super().__init__()
        self.approx_error = None

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def like(cls, module: nn.Module, rank: Rank, **opts: Any) -> "FactorizedLayer":
        """A randomly initialised layer with ``module``'s geometry and the given rank."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Rank, **opts: Any) -> "FactorizedLayer":
        """Decompose ``module``'s weight at ``rank`` and build the layer from the factors."""
        raise NotImplementedError

    @classmethod
    def cost(
        cls,
        module: nn.Module,
        rank: Rank,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        **opts: Any,
    ) -> tuple[int, int]:
        """(parameters, MACs per sample) of the replacement of ``module`` at ``rank``.

        ``in_shape`` / ``out_shape`` are the dense module's traced per-sample input / output
        shapes (no batch dimension), e.g. (C, H, W) for a Conv2d, (..., N) for a Linear.
        """
        raise NotImplementedError

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise ValueError (LayerTypeError for a wrong type) if no rank of this layer can
        replace ``module`` (e.g. a depthwise conv); the message says why."""
        cls._check_type(module)

    # -- helpers for subclasses ---------------------------------------------------------------
    @classmethod
    def _check_type(cls, module: nn.Module) -> None:
        if not isinstance(module, cls.dense_types):
            known = ", ".join(t.__name__ for t in cls.dense_types)
            raise LayerTypeError(
                f"{cls.__name__}: cannot replace a {type(module).__name__}; "
                f"accepted module types: {known}"
            )

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def check_int_rank(layer: str, name: str, value: Any, low: int, high: int, multiple: int = 1) -> int:
    """Validate one integer rank in [low, high] divisible by ``multiple``; return it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{layer}: {name} must be an int, got {value!r} ({type(value).__name__})"
        )
    value = int(value)
    if value < low or value > high:
        raise ValueError(
            f"{layer}: {name}={value} is out of range; accepted: {low} <= {name} <= {high}"
        )
    if value % multiple:
        raise ValueError(
            f"{layer}: {name}={value} must be divisible by groups={multiple} "
            f"(it is split evenly across the groups)"
        )
    return value


def chain_uniform_(weights: Sequence[torch.Tensor], fan_ins: Sequence[int]) -> None:
    """Init a chain of linear maps so the composed map's output variance matches the dense one.

    A dense ``nn.Conv*d`` / ``nn.Linear`` (Kaiming-uniform, a=sqrt(5)) has weight variance
    1 / (3 fan_in), i.e. gain fan_in * var = 1/3. Each of the n stages gets gain (1/3)^(1/n),
    so the product of gains, hence the output variance for iid inputs, is the dense one.
    """
    n = len(weights)
    gain = (1.0 / 3.0) ** (1.0 / n)
    with torch.no_grad():
        for w, fan_in in zip(weights, fan_ins):
            bound = (3.0 * gain / max(fan_in, 1)) ** 0.5
            w.uniform_(-bound, bound)


def dense_bias_(bias: Optional[torch.Tensor], fan_in: int) -> None:
    """The dense layers' default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if bias is not None:
        bound = 1.0 / max(fan_in, 1) ** 0.5
        with torch.no_grad():
            bias.uniform_(-bound, bound)

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

The factory protocol every registered class honours (``surgery.build_layer`` and the planner
call nothing else): ``from_conv`` / ``from_linear`` / ``from_dense(module, rank, **options)``,
``like(module, rank, **options)``, ``cost(module, rank, in_shape, out_shape, **options)``,
``valid_rank(module, rank, **options)`` and ``check(module)``; method extras (TT modes, CP's
``epc``) are keyword options with defaults, the ones a plan's ``LayerSpec.options`` holds.

Inference fusion (``tensorslim.fuse``) calls one more method on a built layer:
``fold_output_affine(scale, shift)``, which makes the layer compute ``scale * y + shift`` per
output channel (a following eval-mode BatchNorm) inside its last stage, not as an extra op.
"""
import math
import numbers
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

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
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> Rank:
        """The valid rank of this layer for ``module`` nearest to ``rank`` (numbers may be
        fractional, e.g. a planner's ``0.5 * channels``): rounded to the nearest multiple the
        layer needs (groups) and clipped to its bounds. ``valid_rank(m, r) == r`` for a valid
        ``r``. ValueError if no rank can replace ``module`` (see ``check``)."""
        raise NotImplementedError

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise ValueError (LayerTypeError for a wrong type) if no rank of this layer can
        replace ``module`` (e.g. a depthwise conv); the message says why."""
        cls._check_type(module)

    # -- inference fusion ---------------------------------------------------------------------
    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make the layer compute ``y -> scale * y + shift`` per output channel (``scale``,
        ``shift``: (out_channels,)) in its last stage: the out-projection's weights and bias
        (created if the layer had none). Used to fold a following eval-mode BatchNorm."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------------------------
    @classmethod
    def _check_type(cls, module: nn.Module) -> None:
        if not isinstance(module, cls.dense_types):
            known = ", ".join(t.__name__ for t in cls.dense_types)
            raise LayerTypeError(
                f"{cls.__name__}: cannot replace a {type(module).__name__}; "
                f"accepted module types: {known}"
            )
        base = next(t for t in cls.dense_types if isinstance(module, t))
        check_stock_forward(cls.__name__, module, base)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


# Subclasses of the dense types that compute exactly what their base computes although their
# class is not the base (see check_stock_forward); extended by register_safe.
_SAFE_TYPES: set[type] = {nn.modules.linear.NonDynamicallyQuantizableLinear}


def register_safe(module_type: type) -> type:
    """Declare that ``module_type`` (a subclass of a dense type, e.g. of ``nn.Conv2d``)
    computes exactly what its dense base computes, so the factorized layers may replace it
    even if it defines its own ``forward``. Exact type only (not its subclasses). Returns
    ``module_type`` (usable as a class decorator)."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_safe: expected an nn.Module subclass, got {module_type!r}")
    _SAFE_TYPES.add(module_type)
    return module_type


def check_stock_forward(layer: str, module: nn.Module, base: type) -> None:
    """LayerTypeError unless ``module`` computes what the dense type ``base`` computes: its
    ``forward`` (and ``_conv_forward`` for convs) is ``base``'s own, or its type was passed to
    ``register_safe``. A subclass with its own forward (weight standardisation, fake
    quantization, ...) would be replaced by a layer that computes something else."""
    kind = type(module)
    if kind is base or kind in _SAFE_TYPES:
        return
    own = [name for name in ("forward", "_conv_forward")
           if hasattr(base, name) and getattr(kind, name, None) is not getattr(base, name)]
    if own:
        raise LayerTypeError(
            f"{layer}: cannot replace a {kind.__module__}.{kind.__qualname__}: it overrides "
            f"{' and '.join(own)}; kept dense (a factorized layer computes what a plain "
            f"{base.__name__} computes; if this type computes exactly that, declare it with "
            f"tensorslim.layers.register_safe({kind.__name__}))"
        )


def check_finite(layer: str, tensors: Mapping[str, Optional[torch.Tensor]]) -> None:
    """ValueError if any of ``tensors`` (name -> tensor or None) holds NaN or Inf values (no
    decomposition of them means anything), the message starting ``"<layer>: <name>"``. Meta
    tensors (no values) pass. The check is ``tensorslim.tensor``'s, shared with the
    decompositions."""
    from ..tensor._common import check_finite as check_tensor_finite

    for name, t in tensors.items():
        if t is not None and not t.is_meta:
            check_tensor_finite(t.detach(), f"{layer}: {name}")


def check_module_finite(layer: str, module: nn.Module) -> None:
    """``check_finite`` of a dense module's ``weight`` and ``bias``."""
    check_finite(layer, {"weight": getattr(module, "weight", None),
                         "bias": getattr(module, "bias", None)})


def nearest_rank(layer: str, name: str, value: Any, high: int, multiple: int = 1) -> int:
    """The multiple of ``multiple`` in [multiple, high] nearest to ``value`` (a positive
    number, ties rounded up); ``high`` is itself a multiple of ``multiple``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{layer}: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{layer}: {name}={value!r} must be a positive finite number")
    r = multiple * math.floor(float(value) / multiple + 0.5)
    return int(min(max(r, multiple), high))


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


def check_affine(layer: str, channels: int, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """ValueError unless ``scale`` and ``shift`` are float tensors of shape (channels,)."""
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{layer}.fold_output_affine: {name} must be a float tensor, got "
                            f"{type(t).__name__}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{layer}.fold_output_affine: {name} has shape {tuple(t.shape)}; "
                             f"accepted: ({channels},), one value per output channel")


def _new_param(value: torch.Tensor, like: Optional[torch.Tensor]) -> nn.Parameter:
    grad = True if like is None else like.requires_grad
    return nn.Parameter(value, requires_grad=grad)


def fold_affine_(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor, *,
                 axis: int = 0, groups: int = 1) -> None:
    """Fold ``y -> scale * y + shift`` (per output channel) into a conv / linear ``module``:
    its weight scaled along the output-channel ``axis`` (0 for ``nn.Conv*`` / ``nn.Linear``;
    1 for ``nn.ConvTranspose*``, whose weight is (in, out/groups, *k)), its bias
    ``scale * bias + shift`` (created when absent). Computed in float64, stored in the
    weight's dtype, as NEW Parameters: a weight tied to another module keeps its values there.
    """
    w = module.weight
    s, t = scale.detach().double(), shift.detach().double()
    if axis == 0:
        new_w = w.detach().double() * s.reshape((-1,) + (1,) * (w.dim() - 1))
    else:  # transposed conv: output channel o = group * (out/groups) + j at weight[:, j]
        wg = w.detach().double().reshape(groups, w.shape[0] // groups, *w.shape[1:])
        sg = s.reshape(groups, 1, w.shape[1], *(1,) * (w.dim() - 2))
        new_w = (wg * sg).reshape(w.shape)
    module.weight, module.bias = folded_params(w, module.bias, new_w, s, t)


def folded_params(weight: torch.Tensor, bias: Optional[torch.Tensor], scaled_weight: torch.Tensor,
                  scale: torch.Tensor, shift: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """New (weight, bias) Parameters of a layer with ``y -> scale * y + shift`` folded in:
    ``scaled_weight`` (float64, the weight already scaled along its output axis) in the
    weight's dtype, and ``scale * bias + shift`` (``shift`` when there was no bias)."""
    s, t = scale.detach().double(), shift.detach().double()
    new_b = t if bias is None else bias.detach().double() * s + t
    return (_new_param(scaled_weight.to(weight.dtype), weight),
            _new_param(new_b.to(dtype=weight.dtype, device=weight.device), bias if bias is not None else weight))


def dense_bias_(bias: Optional[torch.Tensor], fan_in: int) -> None:
    """The dense layers' default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if bias is not None:
        bound = 1.0 / max(fan_in, 1) ** 0.5
        with torch.no_grad():
            bias.uniform_(-bound, bound)

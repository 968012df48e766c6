"""Registry of factorized layers: (method, dense module type) -> layer class."""
from torch import nn

from .base import FactorizedLayer, register_safe
from .cp import CPConv1d, CPConv2d
from .filtercp import FilterCPConv2d
from .lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear
from .tt import TTLinear
from .ttconv import TTConv2d
from .ttembed import LowRankEmbedding
from .tucker import TuckerConv1d, TuckerConv2d

__all__ = ["LAYERS", "layer_for", "register_safe"]

LAYERS: dict[tuple[str, type], type[FactorizedLayer]] = {
    ("cp", nn.Conv2d): CPConv2d,
    ("cp", nn.Conv1d): CPConv1d,
    ("tucker", nn.Conv2d): TuckerConv2d,
    ("tucker", nn.Conv1d): TuckerConv1d,
    ("svd", nn.Linear): LowRankLinear,
    ("svd", nn.Conv2d): LowRankConv2d,
    ("svd", nn.Conv1d): LowRankConv1d,
    ("tt", nn.Linear): TTLinear,
    ("filtercp", nn.Conv2d): FilterCPConv2d,
    ("tt", nn.Conv2d): TTConv2d,
    ("svd", nn.Embedding): LowRankEmbedding,
}


def layer_for(method: str, module: nn.Module) -> type[FactorizedLayer]:
    """The layer class that replaces ``module`` with ``method``.

    A subclass of a registered dense type counts only if it computes what that type computes:
    its ``forward`` (and ``_conv_forward`` for convs) is the stock one, or its type was
    declared with ``register_safe`` (``nn.modules.linear.NonDynamicallyQuantizableLinear`` is).
    ValueError if the combination is unknown, if ``module`` overrides forward (it is kept
    dense), or if that layer can replace no module like this one at any rank (e.g. a
    depthwise conv); the message says why."""
    for cls in type(module).__mro__:
        layer = LAYERS.get((method, cls))
        if layer is not None:
            layer.check(module)
            return layer
    known = ", ".join(f"({m!r}, {t.__name__})" for m, t in LAYERS)
    raise ValueError(
        f"layer_for: no factorized layer for method={method!r} and module type "
        f"{type(module).__name__}; known combinations: {known}"
    )

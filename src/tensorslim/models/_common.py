"""Argument checks shared by the reference architectures."""
from __future__ import annotations


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def check_common(model: str, width: float, in_channels: int, num_classes: int) -> None:
    """Raise ValueError/TypeError naming ``model`` for bad constructor arguments."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"{model}: width must be a number > 0, got {width!r}")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{model}: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{model}: {name} must be >= 1, got {value}")

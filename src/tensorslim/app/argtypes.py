"""argparse types of the command line: each parses one argument or answers with the values it
accepts (argparse turns that into a one-line error, exit code 2)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def number(conv: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``conv(text)`` that must satisfy ``ok``, else the accepted values."""
    def parse(text: str) -> Any:
        try:
            value = conv(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


pos_int = number(int, lambda v: v >= 1, "a positive int (1, 2, ...)")
count = number(int, lambda v: v >= 0, "an int >= 0")
pos_float = number(float, lambda v: 0 < v < float("inf"), "a positive number")
fraction = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def ranks(text: str) -> Any:
    """--ranks: an int, a fraction in (0, 1], or a JSON object {layer: rank}."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected an int (8), a fraction in (0, 1] (0.25) or a JSON object "
            f"'{{\"features.3\": 8}}', got {text!r}")
    return value


def names(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 4,8,16, got {text!r}") from None


def method_name(text: str) -> str:
    """--method: a factorization of tensorslim.plan.METHODS or a registered pipeline (the
    pipelines are imported only for a name that is not a factorization)."""
    from ..plan import METHODS

    if text in METHODS:
        return text
    from ..methods.registry import PIPELINES, pipeline

    try:
        pipeline(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(METHODS)} or a pipeline ({', '.join(sorted(PIPELINES))}), "
            f"got {text!r}") from None
    return text

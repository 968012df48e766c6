"""One way to take settings (a leaf module: imports nothing of the package).

A function with many settings takes ONE frozen dataclass ``config`` and, for convenience,
the same settings as keywords by field name::

    train(model, loader, TrainOptions(epochs=3), lr=0.1)   # lr overrides the config's
    train(model, loader, epochs=3, lr=0.1)                 # the same

:func:`resolve` merges the two (the dataclass validates itself in ``__post_init__``), and
:func:`from_namespace` is the CLI's one generic mapping of parsed arguments onto fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


def field_names(cls: type) -> tuple[str, ...]:
    """The settings a config dataclass accepts, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return tuple(f.name for f in dataclasses.fields(cls))


def _unknown(where: str, cls: type, keys: list[str]) -> TypeError:
    names = field_names(cls)
    hints = [m for k in keys for m in difflib.get_close_matches(k, names, n=1)]
    hint = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
    return TypeError(f"{where}: unknown setting(s) {', '.join(map(repr, keys))}{hint}; "
                     f"accepted: {', '.join(names)}")


def resolve(cls: type[T], config: T | Mapping[str, Any] | None, overrides: Mapping[str, Any],
            where: str) -> T:
    """``config`` (an instance of ``cls``, a mapping of its fields, or None for the defaults)
    with ``overrides`` applied; unknown names raise a one-line TypeError naming ``where``."""
    if config is not None and not isinstance(config, (cls, Mapping)):
        raise TypeError(f"{where}: config must be a {cls.__name__} or a mapping of its fields, "
                        f"got {type(config).__name__}")
    base = dict(config) if isinstance(config, Mapping) else {}
    bad = sorted(k for k in [*base, *overrides] if k not in field_names(cls))
    if bad:
        raise _unknown(where, cls, bad)
    if isinstance(config, cls):
        return dataclasses.replace(config, **overrides) if overrides else config
    values = {**base, **overrides}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"{where}: missing required setting(s) {', '.join(map(repr, missing))}")
    return cls(**values)


def from_namespace(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The config built from parsed CLI arguments whose ``dest`` is a field name; an argument
    left at None keeps the field's default. ``extra`` sets fields that have no argument."""
    names = set(field_names(cls))
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return resolve(cls, None, {**values, **extra}, cls.__name__)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_int(name: str, value: Any, low: int = 0, *, where: str = "", none_ok: bool = False,
              hint: str = "") -> None:
    """ValueError ``"[where: ]{name} must be an int >= {low}[ or None][ hint], got {value!r}"``
    unless ``value`` is an int (not a bool) >= ``low`` (or None with ``none_ok``): the one
    check of every config's count fields."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        prefix, alt, note = f"{where}: " if where else "", " or None" if none_ok else "", f" {hint}" if hint else ""
        raise ValueError(f"{prefix}{name} must be an int >= {low}{alt}{note}, got {value!r}")


def check_number(name: str, value: Any, ok: Callable[[float], bool], accepted: str, *,
                 where: str = "") -> None:
    """ValueError ``"[where: ]{name} must be {accepted}, got {value!r}"`` unless ``value`` is a
    finite real number (not a bool) with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not ok(value):
        raise ValueError(f"{f'{where}: ' if where else ''}{name} must be {accepted}, got {value!r}")

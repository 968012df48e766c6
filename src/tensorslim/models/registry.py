"""Model registry: ``create(name, **kwargs)`` builds a model and records how it was built.

Every model made by :func:`create` carries ``model.tensorslim_arch = {"name": ..., "kwargs":
{...}}`` with all constructor arguments (defaults filled in), JSON-serialisable, so a
checkpoint (safetensors weights + this dict) can rebuild it with ``create(**arch)``-style
calls: ``create(arch["name"], **arch["kwargs"])``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from tensorslim.models.resnet import resnet18, resnet20
from tensorslim.models.vgg import vgg16

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str, factory: ModelFactory) -> None:
    """Add ``factory`` (keyword-only constructor arguments) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str) -> ModelFactory:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_kwargs(name: str) -> dict[str, Any]:
    """The constructor arguments of model ``name`` with their defaults."""
    sig = inspect.signature(_factory(name))
    return {k: p.default for k, p in sig.parameters.items()}


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` (see :func:`list_models`) with ``kwargs``.

    Raises ValueError for an unknown name (listing the known ones) and TypeError for an
    unknown argument (listing the accepted ones).
    """
    factory = _factory(name)
    defaults = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"model {name!r} got unknown argument(s) {unknown}; "
                        f"accepted: {sorted(defaults)}")
    full = {**defaults, **kwargs}
    model = factory(**full)
    model.tensorslim_arch = {"name": name, "kwargs": _jsonable(full)}
    return model


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


register("vgg16", vgg16)
register("resnet20", resnet20)
register("resnet18", resnet18)

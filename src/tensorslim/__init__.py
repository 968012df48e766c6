"""tensorslim: compress trained PyTorch networks with tensor methods.

Public API (stable names)::

    import tensorslim as ts
    ts.tensor.{unfold, fold, mode_dot, multi_mode_dot, khatri_rao, kron, hadamard,
               svd, cp_als, tucker, tt_svd, tt_matrix, rel_error}
    ts.layers.{CPConv2d, TuckerConv2d, LowRankLinear, TTLinear, ...}
    ts.make_plan, ts.compress, ts.count, ts.measure_latency, ts.CompressionPlan, ts.LayerSpec
    ts.fuse (fold eval-mode BatchNorms into the layers before them, for inference)
    ts.calibrate.recalibrate_bn (BatchNorm statistics after compression)
    ts.reconstruct.reconstruct (data-aware refit of the factors to the dense layers' outputs)

Submodules are imported on first use so ``import tensorslim`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "make_plan": "tensorslim.planning",
    "CompressionPlan": "tensorslim.plan",
    "LayerSpec": "tensorslim.plan",
    "compress": "tensorslim.surgery",
    "count": "tensorslim.cost",
    "CostReport": "tensorslim.cost",
    "measure_latency": "tensorslim.cost",
    "fuse": "tensorslim.fusion",
    "save": "tensorslim.io",
    "load": "tensorslim.io",
}
_SUBMODULES = {"tensor", "layers", "rank", "planning", "methods", "data", "models", "train", "io", "report",
               "calibrate", "reconstruct"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tensorslim.{name}")
    raise AttributeError(f"module 'tensorslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))

"""Factorized layers that RUN the factorized form (CP, Tucker-2, SVD, Tensor-Train, filter-wise
CP; TT and low-rank embeddings).

Each class replaces one dense module type; ``LAYERS`` maps (method, dense type) -> class and
``layer_for(method, module)`` looks it up. Every class has ``from_dense(module, rank, **opts)``
(decompose), ``like(module, rank, **opts)`` (random init, same geometry),
``cost(module, rank, in_shape, out_shape, **opts) -> (params, MACs per sample)``,
``valid_rank(module, rank, **opts)`` (nearest valid rank) and ``check(module)``; see ``base``.
``register_safe(type)`` declares a subclass of a dense type with its own forward as computing
exactly what the dense type computes (otherwise such modules are kept dense).
"""
from .base import FactorizedLayer, LayerTypeError
from .cp import CPConv1d, CPConv2d
from .filtercp import FilterCPConv2d
from .lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear
from .registry import LAYERS, layer_for, register_safe
from .tt import TTLinear, factorize
from .ttconv import TTConv2d
from .ttembed import LowRankEmbedding, TTEmbedding
from .tucker import TuckerConv1d, TuckerConv2d

__all__ = [
    "FactorizedLayer",
    "LayerTypeError",
    "CPConv2d",
    "CPConv1d",
    "TuckerConv2d",
    "TuckerConv1d",
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankConv1d",
    "TTLinear",
    "TTConv2d",
    "TTEmbedding",
    "LowRankEmbedding",
    "FilterCPConv2d",
    "factorize",
    "LAYERS",
    "layer_for",
    "register_safe",
]

"""Compression pipelines, each one file with one entry function.

The pipelines registered in ``registry.PIPELINES`` (importing this package imports them all:
ltc, norton, ccpd, ron, asnet) are reachable as ``tensorslim compress --method NAME`` and
covered by the generic tests (tests/methods/test_pipelines.py).
"""
from .oneshot import OneShotResult, oneshot
from .musco import MuscoOptions, MuscoResult, musco
from .registry import PIPELINES, Pipeline, pipeline, register_pipeline
from .ltc import LTCOptions, LTCResult, ltc
from .norton import NortonResult, norton
from .ccpd import ccpd
from .ron import RONResult, ron
from .asnet import ASNetResult, asnet

__all__ = ["OneShotResult", "oneshot", "MuscoOptions", "MuscoResult", "musco",
           "PIPELINES", "Pipeline", "pipeline", "register_pipeline",
           "LTCOptions", "LTCResult", "ltc", "NortonResult", "norton", "ccpd",
           "RONResult", "ron", "ASNetResult", "asnet"]

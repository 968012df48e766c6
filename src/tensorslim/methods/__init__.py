"""Compression pipelines, each one file with one entry function.

The pipelines registered in ``registry.PIPELINES`` (importing this package imports them all)
are reachable as ``tensorslim compress --method NAME`` and covered by the generic tests.
"""
from .oneshot import OneShotResult, oneshot
from .musco import MuscoOptions, MuscoResult, musco
from .ltc import LTCOptions, LTCResult, ltc
from .registry import PIPELINES, Pipeline, pipeline, register_pipeline
from . import ron  # noqa: F401 - registers the "ron" pipeline
from . import asnet  # noqa: F401 - registers the "asnet" pipeline

__all__ = ["OneShotResult", "oneshot", "MuscoOptions", "MuscoResult", "musco",
           "LTCOptions", "LTCResult", "ltc",
           "PIPELINES", "Pipeline", "pipeline", "register_pipeline"]

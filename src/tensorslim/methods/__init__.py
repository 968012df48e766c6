"""Compression pipelines, each one file with one entry function."""
from .oneshot import OneShotResult, oneshot
from .musco import MuscoOptions, MuscoResult, musco

__all__ = ["OneShotResult", "oneshot", "MuscoOptions", "MuscoResult", "musco"]

"""Compression pipelines, each one file with one entry function."""
from .oneshot import OneShotResult, oneshot
from .musco import MuscoResult, musco

__all__ = ["OneShotResult", "oneshot", "MuscoResult", "musco"]

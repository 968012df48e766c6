"""Compression pipelines, each one file with one entry function."""
from .oneshot import OneShotResult, oneshot

__all__ = ["OneShotResult", "oneshot"]

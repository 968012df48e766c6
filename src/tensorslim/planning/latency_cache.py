"""The on-disk cache of measured layer latencies (one JSON file per machine key).

A latency measured here is only worth reusing on the same machine in the same state, so each
file belongs to one *machine key*: the CPU model (``/proc/cpuinfo`` "model name"), torch's
thread count, the torch version, the memory allocator, the device and the timer. A file whose
recorded key differs from the current one is never read (a changed key is a different file;
the recorded key guards against a stale or hand-edited one). Inside a file every entry is
keyed by what was timed: layer type and geometry, input shape (with the batch) and strides,
layout, dtype, method, rank and options; a whole model by its class, structure and inputs; a
whole-plan check by the model and the chosen ranks.

The folder is ``$TENSORSLIM_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/tensorslim/latency``,
else ``~/.cache/tensorslim/latency``. Files are written atomically; a folder that cannot be
written only warns (planning then measures again next time).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

CACHE_VERSION = 1
ENV_VAR = "TENSORSLIM_CACHE_DIR"


def cache_dir() -> Path:
    """The folder of the latency cache files (see the module docstring)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensorslim" / "latency"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("flags", "features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def channel_block() -> int:
    """The channel block oneDNN's convolution kernels use on this CPU: 16 with AVX-512,
    else 8 (AVX2)."""
    return 16 if "avx512f" in cpu_flags() else 8


def machine_key(device: str = "cpu", timer: str = "interleaved-median") -> dict[str, Any]:
    """What a cached latency depends on besides the timed layer itself."""
    from ..runtime import allocator

    dev = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model()
    return {"version": CACHE_VERSION, "device": dev, "threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "allocator": allocator(), "timer": timer}


class LatencyCache:
    """The cached entries of one machine key: ``get(entry)`` -> ms or None, ``put``, ``save``.
    ``enabled=False`` makes it read and write nothing."""

    def __init__(self, key: Mapping[str, Any], enabled: bool = True) -> None:
        self.key = dict(key)
        self.enabled = enabled
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir() / f"latency-{digest}.json"
        self.entries: dict[str, float] = self._read() if enabled else {}
        self._new: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("entries"), dict):
            return {}  # another machine state (or not a cache file): never used
        return {str(k): float(v) for k, v in data["entries"].items() if isinstance(v, (int, float))}

    def get(self, entry: str) -> float | None:
        return self.entries.get(entry)

    def put(self, entry: str, ms: float) -> None:
        self.entries[entry] = self._new[entry] = float(ms)

    def save(self) -> None:
        """Merge the new entries into the file (re-read first, so concurrent planners lose
        little) and write it atomically."""
        if not self.enabled or not self._new:
            return
        from ..files import write_text_atomic

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self._new}
            write_text_atomic(self.path, json.dumps({"key": self.key, "entries": merged}, indent=0))
            self._new = {}
        except OSError as e:
            warnings.warn(f"cannot write the latency cache {self.path} ({e}); set ${ENV_VAR} to a "
                          f"writable folder to keep measured latencies", RuntimeWarning, stacklevel=3)

"""The memory allocator a process runs on, and re-launching a command under TCMalloc.

Factorized layers allocate more, smaller intermediates than the dense layer they replace,
and a batch's output (67 MB for a 256-channel 32x32 map at batch 64) is above glibc's largest
mmap threshold (32 MB), so with the system ``malloc`` every such buffer is a fresh mapping
whose pages fault in on first touch, on every call. TCMalloc keeps freed memory for reuse
(PyTorch's CPU performance guide recommends it or jemalloc for inference). Measured on the
2-core AMD EPYC development machine, 256->256 3x3 conv, batch 64, channels-last,
interleaved medians: dense 180.6 -> 163.7 ms, CP rank 283 (4x fewer MACs) 72.3 -> 51.8 ms,
Tucker-2 (102, 102) 66.8 -> 49.7 ms (speed-ups over dense 2.50x -> 3.16x and 2.68x -> 3.36x);
jemalloc (Debian's default build) was slower than glibc on the same runs.

The allocator is chosen when the process starts (``LD_PRELOAD``), so :func:`relaunch` re-executes
the current command with TCMalloc preloaded. The ``tensorslim`` console script does this by
default (``--allocator system`` or ``TENSORSLIM_ALLOCATOR=system`` turns it off);
:func:`tensorslim.cli.main`, called from Python, never re-executes anything.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

ALLOCATORS = ("tcmalloc", "system")
ENV_VAR = "TENSORSLIM_ALLOCATOR"
_RELAUNCHED = "TENSORSLIM_ALLOCATOR_RELAUNCHED"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
            "/usr/local/lib")
INSTALL_HINT = "apt-get install -y libtcmalloc-minimal4 (scripts/setup.sh does)"


def allocator(maps: str | os.PathLike = "/proc/self/maps") -> str:
    """``"tcmalloc"``, ``"jemalloc"`` or ``"system"``: the allocator library mapped into this
    process (read from ``maps``; ``"system"`` when it cannot be read, e.g. not on Linux)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def find_tcmalloc(dirs: Sequence[str | os.PathLike] = LIB_DIRS) -> str | None:
    """Path of an installed TCMalloc shared library, or None."""
    for d in dirs:
        for name in TCMALLOC_NAMES:
            path = Path(d) / name
            if path.is_file():
                return str(path)
    return None


def preload_env(env: Mapping[str, str], lib: str) -> dict[str, str]:
    """``env`` with ``lib`` first in ``LD_PRELOAD`` (kept once) and the re-launch marker set."""
    out = dict(env)
    rest = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p != lib]
    out["LD_PRELOAD"] = " ".join([lib, *rest])
    out[_RELAUNCHED] = "1"
    return out


def resolve(choice: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The allocator asked for: ``choice`` (a ``--allocator`` value), else ``$TENSORSLIM_ALLOCATOR``,
    else ``tcmalloc``. Unknown values are a ``ValueError`` naming the accepted ones."""
    value = choice if choice is not None else env.get(ENV_VAR, "tcmalloc")
    if value not in ALLOCATORS:
        raise ValueError(f"unknown allocator {value!r} (--allocator / ${ENV_VAR}); "
                         f"accepted: {', '.join(ALLOCATORS)}")
    return value


def relaunch(argv: Sequence[str], choice: str | None = None) -> None:
    """Re-execute ``argv`` (the current command, ``sys.argv`` form) under TCMalloc when it is
    asked for (see :func:`resolve`), installed and not already loaded, on Linux; otherwise
    return.
    A missing library only warns (the command then runs on the system allocator), and a
    relaunched process never relaunches again."""
    if resolve(choice) != "tcmalloc" or allocator() == "tcmalloc":
        return
    if not sys.platform.startswith("linux"):  # LD_PRELOAD and /proc/self/maps are Linux's
        return
    if os.environ.get(_RELAUNCHED):
        warnings.warn("TCMalloc was preloaded but is not mapped; running on the system allocator",
                      RuntimeWarning, stacklevel=2)
        return
    lib = find_tcmalloc()
    if lib is None:
        warnings.warn(f"TCMalloc not found ({INSTALL_HINT}); running on the system allocator, "
                      "latencies of factorized models will be worse", RuntimeWarning, stacklevel=2)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], preload_env(os.environ, lib))


def script_argv(argv: Sequence[str]) -> list[str]:
    """The interpreter arguments that re-run this console script: ``-m tensorslim.cli ARGS``."""
    return ["-m", "tensorslim.cli", *argv]


def allocator_choice(argv: Sequence[str]) -> str | None:
    """The value of ``--allocator X`` / ``--allocator=X`` in ``argv``, if given."""
    for i, a in enumerate(argv):
        if a == "--allocator" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--allocator="):
            return a.split("=", 1)[1]
    return None


def add_allocator_option(parser) -> None:
    """``--allocator {tcmalloc,system}`` on an argparse parser (the CLI and benchmark scripts)."""
    parser.add_argument("--allocator", choices=ALLOCATORS, default=None,
                        help=f"memory allocator (default: ${ENV_VAR}, else tcmalloc when installed: "
                             "the process re-launches itself with it preloaded; it speeds up "
                             "factorized layers more than dense ones, see tensorslim/runtime.py)")


def relaunch_script(choice: str | None) -> str:
    """For a script run as ``python script.py ARGS``: :func:`relaunch` it under the allocator
    asked for, print which allocator the (possibly re-launched) process runs on and return it."""
    relaunch(sys.argv, choice)
    name = allocator()
    print(f"memory allocator: {name}")
    return name

#!/usr/bin/env bash
# Set up tensorslim on a fresh Debian machine: Fashion-MNIST (Debian package) and a
# virtual environment in .venv with CPU torch, tensorslim and its test/benchmark extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the official Fashion-MNIST files (required), and TCMalloc (optional: the
# tensorslim command runs under it when present, see src/tensorslim/runtime.py).
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi
fi
apt_install() {  # apt_install PKG...: returns non-zero if it could not
  [ "$SUDO" = none ] && return 1
  [ -n "${APT_UPDATED:-}" ] || { $SUDO apt-get update -qq && APT_UPDATED=1; } || return 1
  $SUDO apt-get install -y -qq "$@" >/dev/null
}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist || echo "setup: cannot install dataset-fashion-mnist (not root, no sudo, or apt failed); set TENSORSLIM_DATA to a folder with the four Fashion-MNIST *-ubyte.gz files" >&2
fi
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  # Debian 13 renamed the package (64-bit time_t transition)
  apt_install libtcmalloc-minimal4 || apt_install libtcmalloc-minimal4t64 \
    || echo "setup: TCMalloc not installed; the tensorslim command will run on the system allocator (slower CPU latencies)" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# constraints.txt pins the CPU torch build so no dependency drags in a CUDA one.
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[test,bench]"

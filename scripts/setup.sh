#!/usr/bin/env bash
# Set up tensorslim on a fresh Debian machine: Fashion-MNIST (Debian package) and a
# virtual environment in .venv with CPU torch, tensorslim and its test/benchmark extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the official Fashion-MNIST files, and TCMalloc (the tensorslim command
# runs under it: see src/tensorslim/runtime.py for why and what it measured).
pkgs=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || pkgs+=(dataset-fashion-mnist)
ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || pkgs+=(libtcmalloc-minimal4)
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "setup: cannot install ${pkgs[*]} (not root, no sudo); set TENSORSLIM_DATA to a folder with the four Fashion-MNIST *-ubyte.gz files; without libtcmalloc-minimal4 the tensorslim command runs on the system allocator" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# constraints.txt pins the CPU torch build so no dependency drags in a CUDA one.
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[test,bench]"

"""The allocator probe and the TCMalloc re-launch of the tensorslim command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import runtime


def test_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert runtime.allocator(maps) == "system"
    maps.write_text("7f00 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert runtime.allocator(maps) == "tcmalloc"
    maps.write_text("7f00 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert runtime.allocator(maps) == "jemalloc"
    assert runtime.allocator(tmp_path / "missing") == "system"


def test_preload_env_puts_the_library_first_once():
    env = runtime.preload_env({"LD_PRELOAD": "/x/liba.so:/lib/t.so", "A": "1"}, "/lib/t.so")
    assert env["LD_PRELOAD"] == "/lib/t.so /x/liba.so" and env["A"] == "1"
    assert env["TENSORSLIM_ALLOCATOR_RELAUNCHED"] == "1"
    assert runtime.preload_env({}, "/lib/t.so")["LD_PRELOAD"] == "/lib/t.so"


def test_resolve_and_the_command_line_choice():
    assert runtime.resolve(None, {}) == "tcmalloc"
    assert runtime.resolve(None, {"TENSORSLIM_ALLOCATOR": "system"}) == "system"
    assert runtime.resolve("system", {"TENSORSLIM_ALLOCATOR": "tcmalloc"}) == "system"
    with pytest.raises(ValueError, match="unknown allocator 'magic'.*accepted: tcmalloc, system"):
        runtime.resolve("magic", {})
    assert runtime.allocator_choice(["--allocator", "system", "demo"]) == "system"
    assert runtime.allocator_choice(["--allocator=tcmalloc", "demo"]) == "tcmalloc"
    assert runtime.allocator_choice(["demo", "--steps", "3"]) is None
    assert runtime.script_argv(["demo"]) == ["-m", "tensorslim.cli", "demo"]


def test_find_tcmalloc_looks_in_the_given_folders(tmp_path):
    assert runtime.find_tcmalloc([tmp_path]) is None
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert runtime.find_tcmalloc([tmp_path]) == str(tmp_path / "libtcmalloc_minimal.so.4")


def _run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    code = ("import sys, json; from tensorslim import cli, runtime; sys.argv = ['tensorslim', *sys.argv[1:]];"
            "cli.main = lambda argv: print(json.dumps([runtime.allocator(), argv])) or 0;"
            "raise SystemExit(cli.entry())")
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TENSORSLIM_ALLOCATOR",
                                                              "TENSORSLIM_ALLOCATOR_RELAUNCHED")}
    return subprocess.run([sys.executable, "-c", code, *args], env={**full, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(runtime.find_tcmalloc() is None, reason="needs libtcmalloc-minimal4 (scripts/setup.sh installs it)")
def test_the_console_script_relaunches_itself_under_tcmalloc():
    # The entry point re-executes `python -m tensorslim.cli ARGS` with TCMalloc preloaded; the
    # relaunched process sees the same arguments and the allocator mapped.
    proc = _run_cli(["evaluate", "--model", "vgg16", "--no-accuracy", "--latency-batch", "1",
                     "--threads", "1", "--json"])
    assert proc.returncode == 0, proc.stderr
    # the relaunched `-m tensorslim.cli` ran the real evaluate, timed under TCMalloc
    res = json.loads(proc.stdout)
    assert res["allocator"] == "tcmalloc" and res["latency_ms"] > 0 and res["params"] == 939_354
    off = _run_cli(["--allocator", "system", "evaluate"])
    assert off.returncode == 0 and json.loads(off.stdout) == ["system", ["--allocator", "system", "evaluate"]]
    env_off = _run_cli(["evaluate"], TENSORSLIM_ALLOCATOR="system")
    assert json.loads(env_off.stdout)[0] == "system"
    bad = _run_cli(["--allocator", "magic", "evaluate"])
    assert bad.returncode == 2 and "accepted: tcmalloc, system" in bad.stderr


def test_measure_latency_records_the_allocator():
    lat = ts.measure_latency(nn.Linear(4, 4), torch.randn(2, 4), repeats=2, warmup=0)
    assert lat.allocator == runtime.allocator() and lat.allocator in ("tcmalloc", "jemalloc", "system")

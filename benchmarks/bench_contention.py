"""Compression wall time of the shipped resnet20 (Tucker-2 and CP at half the MACs) with and without a
concurrent CPU-bound process, with the small-linear-algebra thread guard on and off.

A decomposition of a small kernel is hundreds of sub-millisecond LAPACK / BLAS calls. With
several intra-op threads on a machine where another process keeps a core busy, every parallel
region waits for a descheduled worker; ``tensorslim.tensor._common.small_linalg_threads`` runs
such work on ``$TENSORSLIM_SMALL_LINALG_THREADS`` threads (default 1; 0 turns the guard off).
Each cell runs ``make_plan`` + ``compress`` in a fresh Python process (so the thread setting and
the environment are clean); the competitor is a second process spinning a Python loop.

    python benchmarks/bench_contention.py --threads 2 --timeout 60
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
import tensorslim as ts
from tensorslim.models.checkpoint import load_pretrained
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
model = load_pretrained("resnet20")  # trained on Fashion-MNIST: input (B, 1, 28, 28)
x = torch.randn(1, 1, 28, 28)
t0 = time.perf_counter()
plan = ts.make_plan(model, sys.argv[1], x, target_macs=0.5)
t1 = time.perf_counter()
ts.compress(model, plan, progress=False)
t2 = time.perf_counter()
print(json.dumps({"plan_s": t1 - t0, "compress_s": t2 - t1, "layers": len(plan.compressed)}))
"""

BUSY = "while True:\n    pass\n"


def run_cell(method: str, threads: int, guard: bool, timeout: float) -> dict:
    """make_plan + compress in a child process; {'plan_s', 'compress_s', 'layers'} or
    {'timeout': True} / {'error': text}."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    env["TENSORSLIM_SMALL_LINALG_THREADS"] = "1" if guard else "0"
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(threads)], env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": True}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(cell: dict, timeout: float) -> str:
    if cell.get("timeout"):
        return f"> {timeout:.0f}"
    if "error" in cell:
        return "error"
    return f"{cell['plan_s'] + cell['compress_s']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tucker,cp")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the run")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per cell")
    args = ap.parse_args()
    if args.threads < 1 or args.timeout <= 0:
        ap.error("--threads must be >= 1 and --timeout > 0")
    print(f"cpus={os.cpu_count()} threads={args.threads} load average at start="
          f"{os.getloadavg()[0]:.2f} (other processes of the machine included)")
    rows = []
    for method in args.methods.split(","):
        for busy in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
            try:
                time.sleep(0.5 if busy else 0.0)
                cells = {g: run_cell(method, args.threads, g, args.timeout) for g in (True, False)}
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            errors = [c["error"] for c in cells.values() if "error" in c]
            rows.append((method, busy, cells, errors))
    print(f"\n{'method':8s} {'competitor':>10s} {'guard on [s]':>13s} {'guard off [s]':>14s} "
          f"{'off / on':>9s}")
    for method, busy, cells, errors in rows:
        on, off = cells[True], cells[False]
        ratio = ""
        if "plan_s" in on and "plan_s" in off:
            ratio = f"{(off['plan_s'] + off['compress_s']) / (on['plan_s'] + on['compress_s']):.1f}x"
        elif "plan_s" in on and off.get("timeout"):
            ratio = f"> {args.timeout / (on['plan_s'] + on['compress_s']):.0f}x"
        print(f"{method:8s} {'busy' if busy else 'none':>10s} {fmt(on, args.timeout):>13s} "
              f"{fmt(off, args.timeout):>14s} {ratio:>9s}")
        for e in errors:
            print(f"    error: {e}")


if __name__ == "__main__":
    main()

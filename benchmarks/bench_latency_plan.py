"""Latency-aware planning on a shipped model: for each batch size and ``target_latency``, the
plan's predicted whole-model time next to the measured one (dense vs compressed, median of
interleaved rounds, both fused by ``ts.fuse``) and the measured speed-up.

"correction" and "check ratio" are the plan's own whole-model check (the compressed model with
random factors against the dense one, measured while planning: ``verified_choice`` in
tensorslim/planning/latency.py). The planner's table is measured in a fresh cache folder, so
the first plan per batch shows the uncached planning time (the second target reuses the
table). Timing uses the planner's own timer (thread CPU time with one thread, see
tensorslim/planning/latency_timer.py) and, for reference, the wall clock. The prediction
error is given on the time (predicted ms vs measured ms, which a change of the machine's
load between planning and measuring shifts) and on the ratio to dense (dense measured in the
same rounds as the compressed model).

    python benchmarks/bench_latency_plan.py --threads 1 --batches 1,64 --targets 0.5,0.9
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings

import torch

import tensorslim as ts
from tensorslim.planning import InterleavedTimer, TimingJob
from tensorslim.planning.latency_measure import batched_inputs, prepared, to_layout
from tensorslim.runtime import add_allocator_option, relaunch_script


def measure(models: dict, x: torch.Tensor, layout: str, rounds: int, clock: str) -> dict[str, float]:
    """Median ms per forward of each model, interleaved rounds."""
    timer = InterleavedTimer(rounds=rounds, min_rounds=rounds, warmup=3, clock=clock, budget_s=1e9)
    xs = (to_layout(x, layout),)
    jobs = [TimingJob(name, "dense", None, prepared(m, layout), xs) for name, m in models.items()]
    return dict(zip(models, timer(jobs)))


def fused(model: torch.nn.Module) -> torch.nn.Module:
    return ts.fuse(copy.deepcopy(model).eval())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16", help="a name of ts.models.available_pretrained()")
    p.add_argument("--method", default="tucker")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--targets", default="0.5,0.9")
    p.add_argument("--layout", default="channels_last", choices=("channels_last", "nchw"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=31)
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    os.environ["TENSORSLIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ts-latency-bench-")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = ts.models.load_pretrained(args.model).eval()
    size = ts.models.pretrained_info(args.model)["input"]["size"]
    x1 = torch.randn(1, 1, size, size)
    print(f"{args.model}, {args.method}, {args.layout}, {args.threads} thread(s), fused, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| batch | target | plan s | MACs kept | layers compressed | correction | check ratio | predicted ms | "
          "measured dense ms | measured comp ms | predicted ratio | measured ratio | speed-up | "
          "prediction error (ms / ratio) | wall dense ms | wall comp ms | wall speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in (int(v) for v in args.batches.split(",")):
        xb = batched_inputs(x1, b)[0]
        for t in (float(v) for v in args.targets.split(",")):
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plan = ts.make_plan(model, args.method, x1, target_latency=t, latency_batch=b, layout=args.layout)
            plan_s = time.perf_counter() - t0
            lat = plan.goal["latency"]
            comp = ts.compress(copy.deepcopy(model), plan, progress=False).eval()
            pair = {"dense": fused(model), "comp": fused(comp)}
            cpu = measure(pair, xb, args.layout, args.rounds, "auto")
            wall = measure(pair, xb, args.layout, args.rounds, "wall")
            err = (lat["predicted_ms"] - cpu["comp"]) / cpu["comp"]  # absolute ms, across a load drift
            ratio_err = lat["predicted_ratio"] / (cpu["comp"] / cpu["dense"]) - 1  # vs this run's dense
            check = "-" if lat["measured_ratio"] is None else f"{lat['measured_ratio']:.3f}"
            print(f"| {b} | {t} | {plan_s:.1f} | {plan.macs_ratio:.3f} | {len(plan.compressed)}/{len(plan.layers)} | "
                  f"{lat['correction']:.2f} | {check} | {lat['predicted_ms']:.3f} | {cpu['dense']:.3f} | {cpu['comp']:.3f} | "
                  f"{lat['predicted_ratio']:.3f} | {cpu['comp'] / cpu['dense']:.3f} | "
                  f"{cpu['dense'] / cpu['comp']:.2f}x | {err:+.1%} / {ratio_err:+.1%} | "
                  f"{wall['dense']:.3f} | {wall['comp']:.3f} | "
                  f"{wall['dense'] / wall['comp']:.2f}x |", flush=True)
            for w in caught:
                if "unreachable" in str(w.message):
                    print(f"  note: {w.message}")


if __name__ == "__main__":
    main()

"""Whole-model CPU latency of VGG-16 (28x28 Fashion-MNIST input) dense vs Tucker-2 / CP at 4x
fewer MACs, for several widths, with the time split into factorizable ops (convolutions and
matmuls) and the rest (pooling, batch norm, ReLU, copies) — the part compression cannot touch
bounds the whole-model speed-up (Amdahl). Latency does not depend on the weights' values, so
the widths are built untrained; width 0.25 is the shipped model's architecture.

    python benchmarks/bench_whole_model.py --widths 0.25,0.5,1.0 --batch 64 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch.profiler import profile

import tensorslim as ts
from tensorslim.runtime import add_allocator_option, relaunch_script
from tensorslim.models import create

FACTORIZABLE = ("bmm", "mm", "addmm", "baddbmm", "matmul", "linear")


def split_time(model, x, reps: int) -> tuple[float, float]:
    """(ms in conv/matmul kernels, ms in everything else) per forward, from the profiler."""
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile() as p:
            for _ in range(reps):
                model(x)
    conv = other = 0.0
    for e in p.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            name = e.key[6:]
            if "conv" in name or name in FACTORIZABLE:
                conv += e.self_cpu_time_total
            else:
                other += e.self_cpu_time_total
    return conv / reps / 1e3, other / reps / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="0.25,0.5,1.0")
    p.add_argument("--methods", default="tucker,cp")
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--rank-rule", default=None, help="uniform (default) or min_error (its ranks depend on the "
                   "weights: use --trained for the shipped width-0.25 model's plan)")
    p.add_argument("--trained", action="store_true", help="width 0.25: plan on the shipped trained weights")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x1, xb = torch.randn(1, 1, 28, 28), torch.randn(args.batch, 1, 28, 28)
    print(f"batch {args.batch}, {args.threads} threads, target_macs {args.target_macs}, "
          f"median of {args.rounds} interleaved rounds; best layout (NCHW / channels_last) per model\n")
    print("| width | method | MACs kept | dense ms | comp ms | speed-up | dense conv+mm ms | dense other ms | comp conv+mm ms | comp other ms | conv-only speed-up | Amdahl bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w in (float(v) for v in args.widths.split(",")):
        dense = create("vgg16", width=w).eval()
        if args.trained and w == 0.25:
            dense = ts.models.load_pretrained("vgg16").eval()
        goal = {"target_macs": args.target_macs}
        if args.rank_rule:
            goal["rank_rule"] = args.rank_rule
        for method in args.methods.split(","):
            plan = ts.make_plan(dense, method, x1, **goal)
            comp = ts.compress(copy.deepcopy(dense), plan, progress=False).eval()
            best = {}
            for fmt in (torch.contiguous_format, torch.channels_last):
                d, c = copy.deepcopy(dense).to(memory_format=fmt), copy.deepcopy(comp).to(memory_format=fmt)
                x = xb.contiguous(memory_format=fmt)
                td, tc = [], []
                for _ in range(args.rounds):
                    td.append(ts.measure_latency(d, x, repeats=5, warmup=2).median_ms)
                    tc.append(ts.measure_latency(c, x, repeats=5, warmup=2).median_ms)
                for key, t, m in (("d", statistics.median(td), d), ("c", statistics.median(tc), c)):
                    if key not in best or t < best[key][0]:
                        best[key] = (t, m, x)
            (td, d, xd), (tc, c, xc) = best["d"], best["c"]
            dc, do = split_time(d, xd, 5)
            cc, co = split_time(c, xc, 5)
            bound = (dc + do) / (dc * plan.macs_after / plan.macs_before + do)
            print(f"| {w} | {method} | {plan.macs_after / plan.macs_before:.3f} | {td:.2f} | {tc:.2f} | "
                  f"{td / tc:.2f}x | {dc:.2f} | {do:.2f} | {cc:.2f} | {co:.2f} | {dc / cc:.2f}x | {bound:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()

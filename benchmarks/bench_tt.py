"""TT layers against the dense layers they replace: TTLinear and TTConv2d speed.

``--part linear``: TTLinear 4096 x 4096 (modes 16x16x16) vs dense nn.Linear and tensorly-torch's TT linear.

TT-ranks 64, 16 and 8; batch 8, 64, 512; CPU, 2 threads (default). tensorly-torch:
``tltorch.FactorizedLinear((16,16,16), (16,16,16), factorization='blocktt', rank=r,
implementation='factorized')`` (its TT-matrix). Timings interleaved, median reported.
"speed / MAC-pred." = measured speed-up / (dense MACs / TT MACs): 1.0 means the layer runs
at the speed its MAC count predicts.

    python benchmarks/bench_tt.py
    python benchmarks/bench_tt.py --ranks 8 --batches 64 --repeats 5   # quick

``--part conv``: every TTConv2d of ``make_plan(vgg16, "tt", x, target_params=t)`` (the shipped
VGG-16, 28x28 inputs) and a 64->64 3x3 conv at 32x32 (TT-rank 8, modes 8x8), each against its
dense nn.Conv2d at batch 1 and 64 (8 for the 32x32 conv), one process, medians of interleaved
rounds of thread CPU time (less sensitive to other processes than wall time). "ratio" =
speed-up / MAC reduction (1.0: as fast as its MACs predict); "before" rebuilds the kernels it
derives from the cores on every call and im2cols with ``F.unfold`` (``eager_cache = False``:
the previous forward, except that it already reads the cores without ParameterList indexing),
"after" is the layer as shipped (inference cache; small inputs take ``small_forward``, its
im2col a cached gather; under glibc's allocator, ``--allocator system``, large batches run in
slices of about ``chunk_bytes`` of state). ``--before conv`` makes "before" the older forward that runs the merged spatial +
first-core step always as a conv (``im2col_pixels = 0`` too). ``--profile`` prints
torch.profiler's top ops per layer.

    python benchmarks/bench_tt.py --part conv --threads 1
    python benchmarks/bench_tt.py --part conv --threads 1 --targets 0.3 --rounds 3   # quick
    python benchmarks/bench_tt.py --part conv --threads 1 --rounds 5   # the issue-19 reports' run

The load average is printed before and after (timings are only comparable within one run).
"""
import argparse
import copy
import os
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from tensorslim.runtime import add_allocator_option, relaunch_script
from tensorslim.layers import TTConv2d, TTLinear

N = 4096
MODES = (16, 16, 16)


def tltorch_tt(rank: int) -> Optional[nn.Module]:
    try:
        import tltorch
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = tltorch.FactorizedLinear(MODES, MODES, factorization="blocktt", rank=rank,
                                             implementation="factorized").eval()
            layer(torch.randn(2, N))
        return layer
    except Exception as exc:  # report, do not fail the benchmark
        print(f"tltorch BlockTT rank {rank} failed: {type(exc).__name__}: {exc}")
        return None


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# -- TTConv2d ------------------------------------------------------------------------------------
def conv_cases(targets: list[float]) -> list[tuple[str, nn.Conv2d, TTConv2d, tuple[int, ...]]]:
    """(name, dense conv, its TTConv2d, per-sample input shape) of every TT conv of the VGG-16
    plans, and the 64->64 3x3 conv at 32x32 with TT-rank 8, modes 8x8."""
    import tensorslim as ts

    dense = ts.models.load_pretrained("vgg16").eval()
    x = torch.randn(1, 1, 28, 28)
    out = []
    for t in targets:
        plan = ts.make_plan(dense, "tt", x, target_params=t)
        comp = ts.compress(copy.deepcopy(dense), plan, progress=False).eval()
        mods, dmods = dict(comp.named_modules()), dict(dense.named_modules())
        out += [(f"{t:g}:{s.name}", dmods[s.name], mods[s.name], tuple(s.in_shape[1:]))
                for s in plan.layers if isinstance(mods[s.name], TTConv2d)]
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    out.append(("64->64 32x32", conv, TTConv2d.from_conv(conv, 8, in_modes=(8, 8), out_modes=(8, 8)).eval(),
                (64, 32, 32)))
    return out


def time_rounds(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = 0.02) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each function's thread CPU time per call (a
    round repeats a call until ``budget_s`` of the first call's time is spent)."""
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        reps = {}
        for k, fn in fns.items():
            t0 = time.thread_time()
            fn()
            reps[k] = max(1, int(budget_s / max(time.thread_time() - t0, 1e-6)))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.thread_time()
                for _ in range(reps[k]):
                    fn()
                times[k].append((time.thread_time() - t0) / reps[k])
    return {k: statistics.median(v) for k, v in times.items()}


def profile_top(layer: nn.Module, x: torch.Tensor, rows: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            layer(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def conv_part(targets: list[float], rounds: int, profile: bool, before_kind: str = "uncached",
              batches: tuple[int, ...] = (1, 64)) -> None:
    head = (f"{'layer':16s} {'TT-ranks':12s} {'in':11s} {'batch':>5s} {'MACs /':>7s} {'dense ms':>9s} "
            f"{'before ms':>9s} {'after ms':>9s} {'ratio before':>12s} {'ratio after':>11s}")
    print(head + "\n" + "-" * len(head))
    for name, dense, tt, shape in conv_cases(targets):
        before = copy.deepcopy(tt)
        before.eager_cache = False  # kernels rebuilt per call, F.unfold
        if before_kind == "conv":
            before.im2col_pixels = 0  # the merged step always as a conv
        for b in sorted({bb if shape[-1] < 32 else min(bb, 8) for bb in batches}):
            x = torch.randn(b, *shape)
            with torch.inference_mode():
                ref = dense(x)
                torch.testing.assert_close(tt(x), before(x), rtol=1e-4, atol=1e-4)
            mac_red = dense.weight.numel() * ref.shape[2] * ref.shape[3] * b / tt.macs(x.shape)
            t = time_rounds({"dense": lambda: dense(x), "before": lambda: before(x), "after": lambda: tt(x)},
                            rounds)
            print(f"{name:16s} {str(tt.rank):12s} {'x'.join(map(str, shape)):11s} {b:5d} {mac_red:7.3f} "
                  f"{1e3 * t['dense']:9.3f} {1e3 * t['before']:9.3f} {1e3 * t['after']:9.3f} "
                  f"{t['dense'] / t['before'] / mac_red:12.2f} {t['dense'] / t['after'] / mac_red:11.2f}")
            if profile:
                print(profile_top(tt, x))
    print("MACs / = dense MACs over TT MACs (< 1: the TT layer does more MACs); ratio = speed-up / "
          "MAC reduction")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=["linear", "conv", "all"], default="all")
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.1],
                   help="conv part: target_params of the VGG-16 TT plans")
    p.add_argument("--rounds", type=int, default=7, help="conv part: interleaved rounds")
    p.add_argument("--profile", action="store_true", help="conv part: torch.profiler top ops")
    p.add_argument("--before", choices=["uncached", "conv"], default="uncached",
                   help="conv part: the 'before' forward (see the module doc)")
    p.add_argument("--conv-batches", type=int, nargs="+", default=[1, 64],
                   help="conv part: batch sizes (the 32x32 conv runs at most 8)")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 16, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.part in ("conv", "all"):
        print(f"load {open('/proc/loadavg').read().split()[:3]}" if os.path.exists("/proc/loadavg") else "")
        conv_part(args.targets, args.rounds, args.profile, args.before, tuple(args.conv_batches))
        if os.path.exists("/proc/loadavg"):
            print(f"load {open('/proc/loadavg').read().split()[:3]}")
    if args.part == "conv":
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, Linear {N}x{N}, "
          f"modes {MODES}, median of {args.repeats} interleaved runs\n")
    dense = nn.Linear(N, N).eval()
    dense_params = sum(q.numel() for q in dense.parameters())
    head = (f"{'TT-rank':>7s} {'batch':>5s} {'params /':>9s} {'MACs /':>7s} {'dense ms':>9s} "
            f"{'TT ms':>8s} {'speed-up':>8s} {'speed/MAC-pred.':>15s} {'tltorch ms':>10s} "
            f"{'tltorch x':>9s}")
    print(head)
    print("-" * len(head))
    for rank in args.ranks:
        ours = TTLinear(N, N, MODES, MODES, rank).eval()
        peer = tltorch_tt(rank)
        params_ratio = dense_params / ours.num_params()
        mac_ratio = (N * N) / ours.macs((N,))
        for b in args.batches:
            x = torch.randn(b, N)
            fns: dict[str, Callable[[], object]] = {"ours": lambda: ours(x)}
            if peer is not None:
                fns["tltorch"] = lambda: peer(x)
            fns["dense"] = lambda: dense(x)
            t = time_interleaved(fns, args.repeats)
            speed = t["dense"] / t["ours"]
            peer_s = (f"{t['tltorch']:10.2f} {t['dense'] / t['tltorch']:9.2f}"
                      if "tltorch" in t else f"{'n/a':>10s} {'':>9s}")
            print(f"{rank:7d} {b:5d} {params_ratio:8.1f}x {mac_ratio:6.2f}x {t['dense']:9.2f} "
                  f"{t['ours']:8.2f} {speed:8.2f} {speed / mac_ratio:15.2f} {peer_s}")
    print("params / and MACs / are dense over TT (> 1: TT is smaller / cheaper); "
          "TT MACs from TTLinear.macs().")


if __name__ == "__main__":
    main()

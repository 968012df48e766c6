"""Latency of tensorslim's factorized convs vs dense nn.Conv2d and tensorly-torch.

256 -> 256 channels, 3x3, padding 1, 32x32 input, batch 8 and 64, CPU, 2 threads (default).
For each MAC reduction (2x, 4x, 8x) the rank is the largest whose MAC count is at most
dense / reduction; tensorly-torch (``tltorch.FactorizedConv.from_conv(conv, rank,
factorization='cp'|'tucker', implementation='factorized')``) gets the same rank. Timings are
interleaved (ours, tltorch, dense in one loop, several rounds) and the median is reported.
The CL columns run ours and dense on a channels_last input (the fastest CPU layout).

    python benchmarks/bench_layers.py                 # full table
    python benchmarks/bench_layers.py --stages        # per-stage breakdown of our layers
    python benchmarks/bench_layers.py --reductions 4 --batches 8 --repeats 5   # quick
"""
import argparse
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from tensorslim.runtime import add_allocator_option, relaunch_script
from tensorslim.layers import CPConv2d, TuckerConv2d

C, K, HW = 256, 3, 32


def dense_macs() -> int:
    return C * C * K * K * HW * HW


def pick_rank(cls: type, conv: nn.Module, reduction: float) -> tuple[object, int]:
    """Largest rank whose MACs <= dense / reduction; returns (rank, macs)."""
    budget = dense_macs() / reduction
    best = None
    for r in range(1, C + 1 if cls is TuckerConv2d else 4 * C):
        rank = (r, r) if cls is TuckerConv2d else r
        _, macs = cls.cost(conv, rank, (C, HW, HW), (C, HW, HW))
        if macs > budget:
            break
        best = (rank, macs)
    assert best is not None
    return best


def tltorch_layer(conv: nn.Module, method: str, rank: object) -> Optional[nn.Module]:
    try:
        import tltorch
    except ImportError:
        return None
    if method == "tucker":
        r = rank[0]  # type: ignore[index]
        tl_rank = (r, r, K, K)
        kwargs = dict(fixed_rank_modes="spatial")
    else:
        tl_rank, kwargs = rank, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # decompose_weights=False: random factors; latency does not depend on their values
        return tltorch.FactorizedConv.from_conv(conv, rank=tl_rank, factorization=method,
                                                implementation="factorized",
                                                decompose_weights=False, **kwargs).eval()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each fn, timed round-robin so load changes hit all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main_table(batches: list[int], reductions: list[float], repeats: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, K, padding=1).eval()
    conv_cl = nn.Conv2d(C, C, K, padding=1).eval().to(memory_format=torch.channels_last)
    rows = []
    for method, cls in (("tucker", TuckerConv2d), ("cp", CPConv2d)):
        for red in reductions:
            rank, macs = pick_rank(cls, conv, red)
            ours = cls.like(conv, rank).eval()
            peer = tltorch_layer(conv, method, rank)
            for b in batches:
                x = torch.randn(b, C, HW, HW)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                fns: dict[str, Callable[[], object]] = {"ours": lambda: ours(x),
                                                        "ours_cl": lambda: ours(x_cl)}
                if peer is not None:
                    fns["tltorch"] = lambda: peer(x)
                fns["dense"] = lambda: conv(x)
                fns["dense_cl"] = lambda: conv_cl(x_cl)
                t = time_interleaved(fns, repeats)
                rows.append((method, rank, dense_macs() / macs, b, t["dense"], t["ours"],
                             t.get("tltorch"), t["dense_cl"], t["ours_cl"]))
    head = (f"{'method':7s} {'rank':>10s} {'MAC red.':>8s} {'batch':>5s} {'dense ms':>9s} "
            f"{'ours ms':>8s} {'ours x':>7s} {'tltorch ms':>10s} {'tltorch x':>9s} "
            f"{'ours x/MAC red.':>15s} {'CL: dense ms':>12s} {'ours ms':>8s} {'ours x':>7s}")
    print(head)
    print("-" * len(head))
    for method, rank, red, b, dense, ours_ms, peer_ms, dense_cl, ours_cl in rows:
        peer_s = f"{peer_ms:10.2f} {dense / peer_ms:9.2f}" if peer_ms else f"{'n/a':>10s} {'':>9s}"
        print(f"{method:7s} {str(rank):>10s} {red:8.2f} {b:5d} {dense:9.2f} {ours_ms:8.2f} "
              f"{dense / ours_ms:7.2f} {peer_s} {dense / ours_ms / red:15.2f} "
              f"{dense_cl:12.2f} {ours_cl:8.2f} {dense_cl / ours_cl:7.2f}")
    print("dense / ours / tltorch: contiguous (NCHW) input, as models run by default. "
          "CL columns: channels_last input (and dense weights), both layers return channels_last.")


def stages(batches: list[int], repeats: int) -> None:
    """Per-stage latency of our 4x-MAC-reduction layers (where the time goes)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, K, padding=1).eval()
    for cls in (TuckerConv2d, CPConv2d):
        rank, macs = pick_rank(cls, conv, 4)
        layer = cls.like(conv, rank).eval()
        for b in batches:
            x = torch.randn(b, C, HW, HW)
            fns: dict[str, Callable[[], object]] = {}
            with torch.inference_mode():
                a = layer.project_in(x)
                fns["project_in"] = lambda: layer.project_in(x)
                if cls is TuckerConv2d:
                    c = layer.core(a)
                    fns["core"] = lambda: layer.core(a)
                elif layer.fused:  # the two depthwise factors run as one kh x kw depthwise conv
                    c = layer._depthwise(a)
                    fns["depthwise (fused)"] = lambda: layer._depthwise(a)
                else:
                    h = layer.depth_h(a)
                    c = layer.depth_w(h)
                    fns["depth_h"] = lambda: layer.depth_h(a)
                    fns["depth_w"] = lambda: layer.depth_w(h)
                fns["project_out"] = lambda: layer.project_out(c)
            fns["whole layer"] = lambda: layer(x)
            fns["dense"] = lambda: conv(x)
            t = time_interleaved(fns, repeats)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
            print(f"{cls.__name__} rank={rank} ({dense_macs() / macs:.2f}x fewer MACs) "
                  f"batch {b}: {parts} ms")
            # Ceiling: the speed-up if every stage but the two 1x1 GEMMs took no time at all,
            # and the MAC rate (GMAC/s) each of them runs at next to the dense conv's.
            pw = t["project_in"] + t["project_out"]
            pw_macs = b * HW * HW * 2 * C * (rank[0] if isinstance(rank, tuple) else rank)
            dense_rate = b * dense_macs() / t["dense"] / 1e6
            print(f"  1x1 stages alone: {pw_macs / pw / 1e6:.0f} GMAC/s vs dense conv "
                  f"{dense_rate:.0f} GMAC/s; speed-up ceiling with free middle stage "
                  f"{t['dense'] / pw:.2f}x (measured {t['dense'] / t['whole layer']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--reductions", type=float, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", action="store_true", help="per-stage breakdown instead")
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{C}->{C} {K}x{K} conv on {HW}x{HW}, median of {args.repeats} interleaved runs\n")
    if args.stages:
        stages(args.batches, args.repeats)
    else:
        main_table(args.batches, args.reductions, args.repeats)


if __name__ == "__main__":
    main()

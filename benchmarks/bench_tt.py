"""TTLinear 4096 x 4096 (modes 16x16x16) vs dense nn.Linear and tensorly-torch's TT linear.

TT-ranks 64, 16 and 8; batch 8, 64, 512; CPU, 2 threads (default). tensorly-torch:
``tltorch.FactorizedLinear((16,16,16), (16,16,16), factorization='blocktt', rank=r,
implementation='factorized')`` (its TT-matrix). Timings interleaved, median reported.
"speed / MAC-pred." = measured speed-up / (dense MACs / TT MACs): 1.0 means the layer runs
at the speed its MAC count predicts.

    python benchmarks/bench_tt.py
    python benchmarks/bench_tt.py --ranks 8 --batches 64 --repeats 5   # quick
"""
import argparse
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from tensorslim.runtime import add_allocator_option, relaunch_script
from tensorslim.layers import TTLinear

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 16, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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

"""Dense vs compressed VGG-16 in four CPU runtimes, BatchNorm folded (``ts.fuse``) in both:
torch eager NCHW, torch eager channels_last, ``torch.compile`` (inductor) and onnxruntime
on the fused ONNX export. Batch 1 and batch 64 by default.

The compressed model is planned on the shipped weights when ``--pretrained`` names them
(``--rank-rule``, default min_error) and otherwise on an untrained model of ``--width``
(latency does not depend on the weight values; the ranks of min_error do). No fine-tuning
runs. ``--target-latency`` adds a third model planned by measured latency
(``make_plan(..., target_latency=, latency_batch=)``) for each batch size.

Every (model, runtime) pair is timed interleaved with the others: each round runs each pair
``--repeats`` times (median), the result is the median over ``--rounds`` rounds.

    python benchmarks/bench_runtimes.py --pretrained vgg16 --batches 1,64 --threads 2
    python benchmarks/bench_runtimes.py --width 0.5 --no-compile
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import tensorslim as ts
from tensorslim.export import export_onnx, ort_session
from tensorslim.runtime import add_allocator_option, relaunch_script


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _dense(args: argparse.Namespace) -> torch.nn.Module:
    if args.pretrained:
        return ts.models.load_pretrained(args.pretrained).eval()
    torch.manual_seed(0)
    return ts.models.create("vgg16", width=args.width).eval()


def _models(args: argparse.Namespace, dense: torch.nn.Module, x1: torch.Tensor,
            batch: int) -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (fused model in eval mode, MACs at batch 1)."""
    out = {"dense": (ts.fuse(dense), ts.count(dense, x1).total_macs)}
    plan = ts.make_plan(dense, args.method, x1, target_macs=args.target_macs, rank_rule=args.rank_rule)
    comp = ts.compress(copy.deepcopy(dense), plan, decompose=False, progress=False).eval()
    out[f"{args.method} {args.target_macs:g} MACs"] = (ts.fuse(comp), plan.macs_after)
    if args.target_latency:
        lp = ts.make_plan(dense, args.method, x1, target_latency=args.target_latency,
                          latency_batch=batch)
        lc = ts.compress(copy.deepcopy(dense), lp, decompose=False, progress=False).eval()
        out[f"{args.method} {args.target_latency:g} latency@{batch}"] = (ts.fuse(lc), lp.macs_after)
    return out


def _runners(name: str, model: torch.nn.Module, xb: torch.Tensor, args: argparse.Namespace,
             tmp: Path) -> dict[str, Callable[[], object]]:
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = xb.contiguous(memory_format=torch.channels_last)
    run = {"eager NCHW": lambda: model(xb), "eager channels_last": lambda: cl(xcl)}
    if not args.no_compile:
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        run["torch.compile"] = lambda: compiled(xb)
    path = tmp / f"{name.replace(' ', '_').replace('@', '_')}_{xb.shape[0]}.onnx"
    export_onnx(model, xb, path, check=False)
    sess, xn = ort_session(path, args.threads), xb.numpy()
    run["onnxruntime"] = lambda: sess.run(None, {"input": xn})
    return run


def bench_batch(args: argparse.Namespace, dense: torch.nn.Module, batch: int, tmp: Path) -> None:
    x1, xb = torch.randn(1, 1, 28, 28), torch.randn(batch, 1, 28, 28)
    models = _models(args, dense, x1, batch)
    runs = {n: _runners(n, m, xb, args, tmp) for n, (m, _) in models.items()}
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n, r in runs.items() for k in r}
    with torch.inference_mode():
        for fns in runs.values():  # warm-up (and torch.compile's compilation)
            for fn in fns.values():
                fn(), fn()
        for _ in range(args.rounds):
            for n, fns in runs.items():
                for k, fn in fns.items():
                    times[(n, k)].append(_median_ms(fn, args.repeats))
    med = {key: statistics.median(v) for key, v in times.items()}
    macs_dense = models["dense"][1]
    print(f"\n### batch {batch}\n")
    print("| model | fewer MACs | runtime | ms | speed-up vs fused dense, same runtime | vs best dense |")
    print("|---|---|---|---|---|---|")
    best_dense = min(v for (n, _), v in med.items() if n == "dense")
    for (n, k), v in med.items():
        print(f"| {n} | {macs_dense / models[n][1]:.2f}x | {k} | {v:.3f} | "
              f"{med[('dense', k)] / v:.2f}x | {best_dense / v:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=None, help="a shipped model (ts.models.available_pretrained())")
    p.add_argument("--width", type=float, default=0.25, help="untrained VGG-16 width without --pretrained")
    p.add_argument("--method", default="tucker")
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--rank-rule", default="min_error")
    p.add_argument("--target-latency", type=float, default=None)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    add_allocator_option(p)
    args = p.parse_args()
    relaunch_script(args.allocator)
    torch.set_num_threads(args.threads)
    dense = _dense(args)
    what = args.pretrained or f"untrained vgg16 width {args.width}"
    print(f"{what}, 28x28, {args.threads} threads, BatchNorm folded in every model; "
          f"{args.rank_rule} ranks at target_macs {args.target_macs}; median of {args.rounds} "
          f"interleaved rounds x median of {args.repeats}; torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_runtimes_"))
    for b in (int(v) for v in args.batches.split(",")):
        bench_batch(args, dense, b, tmp)


if __name__ == "__main__":
    main()

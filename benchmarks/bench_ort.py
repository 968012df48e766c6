"""Whole-model latency of the shipped VGG-16 dense vs compressed, in PyTorch eager and in
onnxruntime (which folds BatchNorm into the convs and fuses ReLU, the deployment path).

The compressed models are planned on the shipped weights (``--rank-rule``, default min_error)
at ``--target-macs``; latency does not depend on the weight values, so no decomposition or
fine-tuning runs (random factors of the planned shapes). Both runtimes are timed interleaved,
dense and compressed alike, median of ``--rounds`` rounds of ``--repeats`` runs.

    python benchmarks/bench_ort.py --methods tucker,cp --batch 64 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.export import export_onnx, ort_session


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="tucker,cp")
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--rank-rule", default="min_error")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = ts.models.load_pretrained("vgg16").eval()
    x1, xb = torch.randn(1, 1, 28, 28), torch.randn(args.batch, 1, 28, 28)
    models = {"dense": dense}
    macs = {"dense": ts.count(dense, x1).total_macs}
    for method in args.methods.split(","):
        plan = ts.make_plan(dense, method, x1, target_macs=args.target_macs, rank_rule=args.rank_rule)
        comp = ts.compress(ts.models.load_pretrained("vgg16"), plan, decompose=False, progress=False).eval()
        models[method], macs[method] = comp, plan.macs_after
    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_"))
    runs = {}
    for name, m in models.items():
        path = tmp / f"{name}.onnx"
        export_onnx(m, xb, path, check=False)
        sess, xn = ort_session(path, args.threads), xb.numpy()
        cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
        xcl = xb.contiguous(memory_format=torch.channels_last)
        runs[name] = {"torch NCHW": lambda m=m: m(xb), "torch channels_last": lambda m=cl: m(xcl),
                      "onnxruntime": lambda s=sess, xn=xn: s.run(None, {"input": xn})}
    times = {(n, k): [] for n, r in runs.items() for k in r}
    with torch.inference_mode():
        for fns in runs.values():
            for fn in fns.values():
                fn(), fn()
        for _ in range(args.rounds):
            for n, fns in runs.items():
                for k, fn in fns.items():
                    times[(n, k)].append(_median_ms(fn, args.repeats))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"shipped vgg16 (width 0.25, 28x28), batch {args.batch}, {args.threads} threads, "
          f"{args.rank_rule} ranks at target_macs {args.target_macs}; median of {args.rounds} rounds x "
          f"median of {args.repeats}\n")
    print("| model | MACs | fewer MACs | runtime | ms | speed-up vs dense (same runtime) | vs best dense |")
    print("|---|---|---|---|---|---|---|")
    best_dense = min(v for (n, _), v in med.items() if n == "dense")
    for (n, k), v in med.items():
        print(f"| {n} | {macs[n]:,} | {macs['dense'] / macs[n]:.2f}x | {k} | {v:.2f} | "
              f"{med[('dense', k)] / v:.2f}x | {best_dense / v:.2f}x |")


if __name__ == "__main__":
    main()

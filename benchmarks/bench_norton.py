"""NORTON / CCPD benchmark (issue 18): batched filter-wise CP vs a tensorly parafac loop, and
NORTON vs L1 filter pruning vs Tucker-2 vs CP-EPC (and CCPD) on the shipped VGG-16 (or
``--model resnet20``) at equal MACs and equal fine-tune steps; the rank ablation R in {1, 2, 5, 8}
with / without pruning.

    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part cp
    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part compare --target 0.23 --steps 300
    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part compare --model resnet20 --target 0.5
    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part ablation --steps 300
    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part latency --channels 256

    OMP_NUM_THREADS=1 python benchmarks/bench_norton.py --part compare --target 0.23 --steps 300 \
        --subset 20000 --test 10000 --refit 4 --only refit reconstruct --json out.json

Reduced runs (CPU budget): ``--subset`` training images, ``--test`` test images, ``--steps``
fine-tune steps (the reference fine-tunes 400 epochs), ``--n-iter`` CP-ALS sweeps. ``--json``
writes the rows and the exact command (benchmarks/results/norton/ keeps the runs).
"""
from __future__ import annotations

import argparse
import time

import torch


def bench_cp(channels: int, rank: int, n_iter: int) -> None:
    import tensorly as tl
    from tensorly.decomposition import parafac

    from tensorslim.tensor.filter_cp import filter_cp

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3)
    w = conv.weight.detach().double()
    t0 = time.perf_counter()
    cp = filter_cp(w, rank, n_iter=n_iter, tol=0.0)
    t_batch = time.perf_counter() - t0
    tl.set_backend("numpy")
    t0 = time.perf_counter()
    errs = []
    for o in range(channels):
        x = w[o].numpy()
        res = parafac(x, rank, n_iter_max=n_iter, init="random", random_state=0, tol=0.0)
        rec = tl.cp_to_tensor(res)
        errs.append(float(((rec - x) ** 2).sum() ** 0.5 / (x ** 2).sum() ** 0.5))
    t_loop = time.perf_counter() - t0
    print(f"| filter CP {channels}->{channels} 3x3, R={rank}, {n_iter} sweeps | time (s) | mean rel. error |")
    print("|---|---|---|")
    print(f"| tensorslim filter_cp (batched) | {t_batch:.2f} | {float(cp.errors.mean()):.4f} |")
    print(f"| tensorly parafac loop | {t_loop:.2f} | {sum(errs) / len(errs):.4f} |")
    print(f"speed-up {t_loop / t_batch:.1f}x")


def _tp_prune(model, x, target: float):
    """Torch-Pruning's magnitude (L2 group-norm) pruner, uniform ratio found by bisection so
    the MACs fit ``target``; the classifier's output layer is kept."""
    import copy

    import torch_pruning as tp

    dense_macs, _ = tp.utils.count_ops_and_params(model, x)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=mid, ignored_layers=[last])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, x)
        if macs <= target * dense_macs:
            hi, best = mid, m
        else:
            lo = mid
    return best


def _recovered(pruned, model, loader, steps):
    from tensorslim.recover import RecoverConfig, recover

    cfg = RecoverConfig(bn_steps=50, finetune_steps=steps, lr=0.01, distill=True)
    return recover(pruned, model, cfg, train_loader=loader, progress=False).model


def _unbalanced(model):
    """``model`` with every FilterCPConv2d's factors put back in the convention used before
    the factors were balanced (unit channel and width columns, the CP weight in the height
    factor): the same kernels, a different parameterisation for fine-tuning."""
    from tensorslim.layers import FilterCPConv2d

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FilterCPConv2d) and not mod.clustered:
                a, b, c = mod.project_in.weight, mod.depth_h.weight, mod.depth_w.weight
                na, nc = a.flatten(1).norm(dim=1), c.flatten(1).norm(dim=1)
                a.div_(na.clamp_min(1e-30).view(-1, 1, 1, 1))
                c.div_(nc.clamp_min(1e-30).view(-1, 1, 1, 1))
                b.mul_((na * nc).view(-1, 1, 1, 1))
    return model


def _json_rows(path, meta, rows) -> None:
    import json
    import os
    import sys

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cmd = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    with open(path, "w") as f:
        json.dump({"command": cmd, **meta, "rows": rows}, f, indent=1)


def compare(model_name: str, target: float, steps: int, subset: int, ntest: int, n_iter: int,
            only, json_path=None, refit: int = 0) -> None:
    """One row per method at ``target`` x dense MACs, same recovery (BN re-calibration +
    ``steps`` distilled fine-tune steps at lr 0.01, batch 64). Two NORTON reference rows:
    the factors in the unbalanced convention (everything else equal) and rank 2 without
    pruning (its own MACs, above the target: the best any pruning split at rank 2 can
    start from). ``refit`` > 0 adds the rows with the data-aware refit on that many batches
    (NORTON's channel-factor refit, ``reconstruct_steps`` for Tucker-2 / CP-EPC; BatchNorm
    re-calibration then off, the house default after a refit); L1 / Torch-Pruning have none."""
    import tensorslim as ts
    from tensorslim.data import TensorBatchLoader, make_loaders
    from tensorslim.methods.ccpd import ccpd
    from tensorslim.methods.norton import norton
    from tensorslim.methods.prune import l1_prune
    from tensorslim.train import evaluate

    loaders = make_loaders(64, seed=0, augment=False, subset=subset)
    test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(ntest)), 500)
    model = ts.models.load_pretrained(model_name).eval()
    x = torch.randn(1, 1, 28, 28)
    dense = ts.count(model, x).total_macs
    dense_acc = evaluate(model, test)["accuracy"]
    print(f"dense accuracy {dense_acc:.4f} ({ntest} test images)")
    common = dict(train_loader=loaders.train, finetune_steps=steps, progress=False)
    runs = {
        "NORTON R=2": lambda: norton(model, x, rank=2, target_macs=target, n_iter=n_iter, **common).model,
        "CCPD R=2": lambda: ccpd(model, x, rank=2, target_macs=target, n_iter=n_iter, **common).model,
        "Tucker-2": lambda: ts.methods.oneshot(model, "tucker", x, target_macs=target, **common).model,
        "CP-EPC": lambda: ts.methods.oneshot(model, "cp", x, target_macs=target, cp_epc=True, **common).model,
        "L1 prune": lambda: _recovered(l1_prune(model, x, target_macs=target).model, model,
                                       loaders.train, steps),
        "Torch-Pruning magnitude": lambda: _recovered(_tp_prune(model, x, target), model,
                                                      loaders.train, steps),
        "NORTON R=2, unbalanced factors": lambda: _recovered(_unbalanced(norton(
            model, x, rank=2, target_macs=target, n_iter=n_iter, progress=False).model), model,
            loaders.train, steps),
        "NORTON R=2, no pruning": lambda: norton(model, x, rank=2, n_iter=n_iter, **common).model,
    }
    if refit:  # the data-aware refit on `refit` batches for every method that has one
        runs = {
            f"NORTON R=2 + refit {refit}": lambda: norton(
                model, x, rank=2, target_macs=target, n_iter=n_iter, refit_steps=refit, **common).model,
            f"Tucker-2 + reconstruct {refit}": lambda: ts.methods.oneshot(
                model, "tucker", x, target_macs=target, reconstruct_steps=refit, **common).model,
            f"CP-EPC + reconstruct {refit}": lambda: ts.methods.oneshot(
                model, "cp", x, target_macs=target, cp_epc=True, reconstruct_steps=refit, **common).model,
            **runs}
    print(f"| method (target {target}) | MACs kept | accuracy after {steps} steps | time (s) |")
    print("|---|---|---|---|")
    rows = []
    for name, fn in runs.items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        t0 = time.perf_counter()
        try:
            m = fn().eval()
        except Exception as e:  # noqa: BLE001 - a benchmark row reports the failure
            print(f"| {name} | - | failed: {type(e).__name__}: {str(e)[:100]} | - |", flush=True)
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            continue
        macs = ts.count(m, x).total_macs / dense
        acc, sec = evaluate(m, test)["accuracy"], time.perf_counter() - t0
        print(f"| {name} | {macs:.3f} | {acc:.4f} | {sec:.0f} |", flush=True)
        rows.append({"method": name, "macs_kept": round(macs, 4), "accuracy": acc, "time_s": round(sec)})
        if json_path:
            _json_rows(json_path, {"model": model_name, "target": target, "steps": steps,
                                   "subset": subset, "test": ntest, "n_iter": n_iter, "refit": refit,
                                   "dense_accuracy": dense_acc}, rows)


def ablation(model_name: str, steps: int, subset: int, ntest: int, ranks, n_iter: int,
             prune: float) -> None:
    """NORTON at rank R with / without ``prune`` (rate on every prunable conv): accuracy after
    BN re-calibration, then after ``steps`` distilled fine-tune steps of that same model."""
    import tensorslim as ts
    from tensorslim.data import TensorBatchLoader, make_loaders
    from tensorslim.methods.norton import norton
    from tensorslim.recover import RecoverConfig, recover
    from tensorslim.train import evaluate

    loaders = make_loaders(64, seed=0, augment=False, subset=subset)
    test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(ntest)), 500)
    model = ts.models.load_pretrained(model_name).eval()
    x = torch.randn(1, 1, 28, 28)
    print(f"| R | prune | MACs kept | params kept | acc. before FT | acc. after {steps} steps |")
    print("|---|---|---|---|---|---|")
    for r in ranks:
        for rate in (None, prune):
            res = norton(model, x, rank=r, prune=rate, n_iter=n_iter, train_loader=loaders.train,
                         progress=False)
            a0 = evaluate(res.model, test)["accuracy"]
            cfg = RecoverConfig(bn_steps=0, finetune_steps=steps, lr=0.01, distill=True)
            tuned = recover(res.model, model, cfg, train_loader=loaders.train, progress=False).model
            p = res.plan
            print(f"| {r} | {rate or 0} | {p.macs_after / p.macs_before:.3f} | "
                  f"{p.params_after / p.params_before:.3f} | {a0:.4f} | "
                  f"{evaluate(tuned, test)['accuracy']:.4f} |", flush=True)


def latency(channels: int, size: int, batch: int) -> None:
    """Median time of one 3x3 conv (channels -> channels, size x size, channels-last) dense vs
    FilterCP R=2 vs CP and Tucker-2 at about the same MACs."""
    import tensorslim as ts
    from tensorslim.layers import CPConv2d, FilterCPConv2d, TuckerConv2d

    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval()
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    fcp = FilterCPConv2d.like(conv, 2).eval()
    target = ts.count(fcp, x[:1]).total_macs

    def nearest(cls, ranks):
        best = min(ranks, key=lambda r: abs(ts.count(cls.like(conv, r), x[:1]).total_macs - target))
        return cls.like(conv, best).eval()
    cp = nearest(CPConv2d, range(8, 4 * channels, 8))
    tk = nearest(TuckerConv2d, [(r, r) for r in range(8, channels + 1, 8)])
    print(f"| layer ({channels}->{channels} 3x3, {size}x{size}, batch {batch}) | MACs/sample | ms |")
    print("|---|---|---|")
    for name, m in (("dense", conv), ("FilterCP R=2", fcp), (f"CP R={cp.rank}", cp),
                    (f"Tucker-2 {tk.rank}", tk)):
        ms = ts.measure_latency(m, x, repeats=10, warmup=3, threads=1).median_ms
        print(f"| {name} | {ts.count(m, x[:1]).total_macs:,} | {ms:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", choices=["cp", "compare", "ablation", "latency"], default="cp")
    ap.add_argument("--model", choices=["vgg16", "resnet20", "vgg16_w050"], default="vgg16",
                    help="compare / ablation: the shipped model")
    ap.add_argument("--prune", type=float, default=0.2, help="ablation: pruning rate")
    ap.add_argument("--size", type=int, default=32, help="latency: feature map size")
    ap.add_argument("--batch", type=int, default=8, help="latency: batch")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--target", type=float, default=0.23)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--n-iter", type=int, default=300)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 5, 8])
    ap.add_argument("--only", nargs="*", default=None, help="compare: run only these methods")
    ap.add_argument("--refit", type=int, default=0, help="compare: add rows with the data-aware "
                    "refit on this many batches (NORTON, Tucker-2, CP-EPC)")
    ap.add_argument("--json", default=None, help="compare: write the rows (and the command) here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.part == "cp":
        bench_cp(a.channels, 2, a.n_iter)
    elif a.part == "compare":
        compare(a.model, a.target, a.steps, a.subset, a.test, a.n_iter, a.only, a.json, a.refit)
    elif a.part == "ablation":
        ablation(a.model, a.steps, a.subset, a.test, a.ranks, a.n_iter, a.prune)
    else:
        latency(a.channels, a.size, a.batch)


if __name__ == "__main__":
    main()

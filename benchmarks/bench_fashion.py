"""Whole-model compression of a trained Fashion-MNIST model: Tucker-2 vs CP vs L1 filter pruning
at the same MAC budget, each fine-tuned for the same number of steps (KD from the dense model).

For every method: MACs / params of the result, test accuracy before and after fine-tuning on
the official 10k test set, and CPU latency (batch 64, 2 threads by default) measured
interleaved with the dense model (median of rounds; both NCHW and channels_last, the faster
layout of each model is reported). Prints a Markdown table and writes it (plus JSON) to --out.

    python benchmarks/bench_fashion.py                       # shipped vgg16, 4x fewer MACs
    python benchmarks/bench_fashion.py --checkpoint runs/w_vgg16 --steps 1500
    python benchmarks/bench_fashion.py --methods tucker --steps 50 --test-subset 1000  # quick
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import tensorslim as ts
from tensorslim.runtime import add_allocator_option, relaunch_script
from tensorslim.calibrate import recalibrate_bn
from tensorslim.reconstruct import reconstruct
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.models.checkpoint import WEIGHTS_DIR, checkpoint_info, load_checkpoint
from tensorslim.train import evaluate, fine_tune


def compress_with(method: str, model: nn.Module, x1: torch.Tensor, target: float, args) -> tuple[nn.Module, str]:
    """A compressed copy of ``model`` by ``method``; returns (model, short description)."""
    if method == "l1-prune":
        from tensorslim.methods.prune import l1_prune

        res = l1_prune(model, x1, target_macs=target)
        return res.model, f"L1 filter pruning, {len(res.kept)} convs pruned"
    goal = {"target_macs": target}
    if args.rank_rule:
        goal["rank_rule"] = args.rank_rule
    if method == "cp-epc":  # CP-ALS then CPD-EPC (least sensitivity at the same error)
        method, goal["cp_epc"] = "cp", True
    plan = ts.make_plan(model, method, x1, **goal)
    out = ts.compress(copy.deepcopy(model), plan, progress=True)
    return out, f"{method}, {sum(s.compressed for s in plan.layers)} layers factorized"


def latency_pair(dense: nn.Module, comp: nn.Module, xb: torch.Tensor, rounds: int, threads: int) -> dict:
    """Interleaved medians (ms) of dense and compressed, each in its faster memory layout."""
    out = {}
    for fmt, mf in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        d = copy.deepcopy(dense).to(memory_format=mf).eval()
        c = copy.deepcopy(comp).to(memory_format=mf).eval()
        x = xb.contiguous(memory_format=mf)
        td, tc = [], []
        for _ in range(rounds):
            td.append(ts.measure_latency(d, x, repeats=5, warmup=2, threads=threads).median_ms)
            tc.append(ts.measure_latency(c, x, repeats=5, warmup=2, threads=threads).median_ms)
        out[fmt] = (statistics.median(td), statistics.median(tc))
    best_d = min(v[0] for v in out.values())
    best_c = min(v[1] for v in out.values())
    return {"dense_ms": best_d, "comp_ms": best_c, "speedup": best_d / best_c,
            "by_layout": {k: {"dense_ms": v[0], "comp_ms": v[1], "speedup": v[0] / v[1]} for k, v in out.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--checkpoint", default=str(WEIGHTS_DIR), help="folder with MODEL.safetensors/.json")
    p.add_argument("--methods", default="tucker,cp,cp-epc,l1-prune",
                   help="comma-separated: tucker, cp, cp-epc (CP refined by CPD-EPC), svd, auto, l1-prune")
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--rank-rule", default=None, help="rank rule for the decompositions (default: planner default)")
    p.add_argument("--steps", type=int, default=1500, help="fine-tune steps per method")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bn-steps", type=int, default=50, help="BatchNorm re-calibration batches before fine-tuning (0 = off)")
    p.add_argument("--reconstruct-steps", type=int, default=0,
                   help="data-aware refit of the factors on this many training batches before BN re-calibration (0 = off; not for l1-prune)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads for the latency measurement")
    p.add_argument("--train-threads", type=int, default=1,
                   help="threads for decomposition / fine-tuning / evaluation (1 avoids oversubscription on a shared 2-core machine)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_fashion")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency columns (e.g. when other jobs share the CPU; measure them "
                        "with bench_whole_model.py, which needs no trained weights)")
    add_allocator_option(p)
    args = p.parse_args()
    args.allocator_used = relaunch_script(args.allocator)

    torch.set_num_threads(args.train_threads)
    info = checkpoint_info(args.model, args.checkpoint)
    dense = load_checkpoint(args.model, args.checkpoint)
    size = info.get("input", {}).get("size", 28)
    loaders = make_loaders(args.batch_size, seed=args.seed, augment=True, pad_to_32=size == 32)
    test = loaders.test
    if args.test_subset:
        test = TensorBatchLoader(test.dataset.subset(torch.arange(args.test_subset)), 500)
    x1 = torch.randn(1, 1, size, size)
    xb = torch.randn(args.latency_batch, 1, size, size)
    base = ts.count(dense, x1)
    acc0 = evaluate(dense, test)["accuracy"]
    print(f"{args.model} dense: test acc {acc0:.4f}, {base.total_macs:,} MACs, {base.total_params:,} params")
    rows = [{"method": "dense", "acc_before_ft": acc0, "acc_refit": acc0, "acc_recal": acc0, "acc": acc0, "macs": base.total_macs,
             "params": base.total_params, "speedup": 1.0}]
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        comp, desc = compress_with(method, dense, x1, args.target_macs, args)
        c = ts.count(comp, x1)
        acc_b = evaluate(comp, test)["accuracy"]
        acc_fit = acc_b
        if args.reconstruct_steps and method != "l1-prune":
            loaders.train.set_epoch(9_998)
            reconstruct(comp, dense, loaders.train, steps=args.reconstruct_steps)
            acc_fit = evaluate(comp.eval(), test)["accuracy"]
        acc_r = acc_fit
        if args.bn_steps:
            loaders.train.set_epoch(9_999)
            recalibrate_bn(comp, loaders.train, steps=args.bn_steps)
            acc_r = evaluate(comp.eval(), test)["accuracy"]
        torch.manual_seed(args.seed)
        if args.steps > 0:
            fine_tune(comp, loaders.train, steps=args.steps, lr=args.lr, teacher=copy.deepcopy(dense).eval(),
                      progress=True, log_every=0)
        comp.eval()
        acc = evaluate(comp, test)["accuracy"]
        lat = {} if args.no_latency else latency_pair(dense, comp, xb, args.rounds, args.threads)
        rows.append({"method": method, "desc": desc, "acc_before_ft": acc_b, "acc_refit": acc_fit, "acc_recal": acc_r, "acc": acc,
                     "macs": c.total_macs, "params": c.total_params, **lat,
                     "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"{method}: acc {acc_b:.4f} -> {acc_fit:.4f} (refit) -> {acc_r:.4f} (BN re-cal.) -> {acc:.4f}, MACs "
              f"x{base.total_macs / c.total_macs:.2f}, latency speed-up {lat.get('speedup', float('nan')):.2f}",
              flush=True)
    table = render(rows, base.total_macs, base.total_params, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def render(rows: list[dict], macs0: int, params0: int, args) -> str:
    lines = [f"target_macs={args.target_macs}, {args.steps} fine-tune steps (KD, lr {args.lr}, batch "
             f"{args.batch_size}), data-aware refit {args.reconstruct_steps} batches, BN re-calibration {args.bn_steps} batches, latency batch {args.latency_batch}, {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds, memory allocator {args.allocator_used}", "",
             "| method | MACs | fewer MACs | params | fewer params | acc before FT | after refit | acc after BN re-cal. | acc after FT | drop (pt) | dense ms | ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    acc0 = rows[0]["acc"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['macs']:,} | {macs0 / r['macs']:.2f}x | {r['params']:,} | "
            f"{params0 / r['params']:.2f}x | {r['acc_before_ft']:.4f} | {r['acc_refit']:.4f} | {r['acc_recal']:.4f} | {r['acc']:.4f} | "
            f"{100 * (acc0 - r['acc']):+.2f} | {r.get('dense_ms', float('nan')):.2f} | "
            f"{r.get('comp_ms', float('nan')):.2f} | {r.get('speedup', float('nan')):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

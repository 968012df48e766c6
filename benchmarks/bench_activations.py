"""Activation methods vs weight decomposition on the shipped VGG-16 (Fashion-MNIST).

Accuracy vs MACs for RON alone, ASNet alone, Tucker-2 alone and RON on top of Tucker-2 at
``--fractions`` of the dense MACs, before and after the same fine-tune budget
(``--finetune-steps`` steps, distilled from the dense model), measured latency against dense,
and the universal-perturbation attack rate (top active input direction vs a random one of the
same norm) of the dense and the compressed models.

RON on Tucker-2 at a fraction f: Tucker-2 (``oneshot``) at sqrt(f), then RON at sqrt(f) of
that model's MACs. ASNet's cut is the latest one that fits the fraction (rank 20, degree 2).

Full size (the default flags): 1024 calibration images, 2048 ASNet fitting samples,
300 fine-tune steps of batch 128, the whole official test set. A reduced run that fits a
shared CPU (the numbers in the report come from it):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_activations.py \
        --calib 384 --fit-samples 1024 --finetune-steps 40 --batch 64 --test-samples 1000 \
        --attack-samples 256

(the training subset is then the first 1024 images of the seeded split, fine-tuning sees
40 x 64 of them, accuracies are on the first 1000 official test images). Latencies are
median wall times on 1 thread, batch 1 and batch 64 of random inputs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.analysis import universal_attack
from tensorslim.methods.asnet import asnet
from tensorslim.methods.ron import ron
from tensorslim.train import evaluate, fine_tune


def _take(loader, n):
    out, seen = [], 0
    for x, y in loader:
        out.append((x[: n - seen], y[: n - seen]))
        seen += out[-1][0].shape[0]
        if seen >= n:
            break
    return out


def _compress(name, dense, x, frac, cal, fit):
    if name == "ron":
        return ron(dense, x, calibration=cal, target_macs=frac, progress=False).model
    if name == "asnet":
        return asnet(dense, x, train_loader=fit, target_macs=frac, progress=False).model
    tucker_frac = frac if name == "tucker" else math.sqrt(frac)
    tucker = ts.methods.oneshot(dense, "tucker", x, target_macs=tucker_frac, progress=False).model.eval()
    if name == "tucker":
        return tucker
    return ron(tucker, x, calibration=cal, target_macs=math.sqrt(frac), progress=False).model


def _latency(model, x):
    return ts.measure_latency(model, x, repeats=20, warmup=3, threads=1).median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    p.add_argument("--methods", nargs="+", default=["ron", "asnet", "tucker", "ron+tucker"])
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--fit-samples", type=int, default=2048)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--attack-samples", type=int, default=1024)
    p.add_argument("--attack-eps", type=float, default=0.1)
    p.add_argument("--attack-fraction", type=float, default=0.25)
    p.add_argument("--out", default="benchmarks/results/activations")
    a = p.parse_args()
    torch.manual_seed(0)
    dense = ts.models.load_pretrained(a.model).eval()
    loaders = ts.data.make_loaders(a.batch, augment=False, subset=max(a.calib, a.fit_samples))
    cal = [x for x, _ in _take(loaders.train, a.calib)]
    fit = _take(loaders.train, a.fit_samples)
    test = _take(loaders.test, a.test_samples)
    x = cal[0][:2]
    xb = torch.randn(64, *x.shape[1:])
    base = ts.count(dense, x[:1]).total_macs
    rows = [{"method": "dense", "fraction": 1.0, "macs": base,
             "acc": evaluate(dense, test)["accuracy"], "acc_ft": None,
             "lat_b1": _latency(dense, x[:1]), "lat_b64": _latency(dense, xb)}]
    models = {}
    for frac in a.fractions:
        for name in a.methods:
            t = time.time()
            m = _compress(name, dense, x, frac, cal, fit).eval()
            row = {"method": name, "fraction": frac, "macs": ts.count(m, x[:1]).total_macs,
                   "acc": evaluate(m, test)["accuracy"], "lat_b1": _latency(m, x[:1]),
                   "lat_b64": _latency(m, xb)}
            tuned = copy.deepcopy(m)
            if a.finetune_steps:
                fine_tune(tuned, loaders.train, steps=a.finetune_steps, teacher=dense, progress=False)
            row["acc_ft"] = evaluate(tuned.eval(), test)["accuracy"]
            row["seconds"] = round(time.time() - t, 1)
            rows.append(row)
            models[(name, frac)] = tuned
            print(json.dumps(row), flush=True)
    attacks = _attacks(dense, models, a, fit, test)
    _report(rows, attacks, a)


def _attacks(dense, models, a, fit, test):
    out = {}
    for name, m in [("dense", dense)] + [(n, m) for (n, f), m in models.items() if f == a.attack_fraction]:
        r = universal_attack(m, fit, eps=a.attack_eps, eval_loader=test, max_samples=a.attack_samples)
        out[name] = {"active": r.active_rate, "random": r.random_rate, "norm": r.norm}
        print(name, out[name], flush=True)
    return out


def _report(rows, attacks, a) -> None:
    dense = rows[0]
    lines = ["| method | target | MACs (x fewer) | acc | acc after fine-tune | latency b1 (speed-up) "
             "| latency b64 (speed-up) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ft = "" if r["acc_ft"] is None else f"{100 * r['acc_ft']:.2f}"
        lines.append(f"| {r['method']} | {r['fraction']} | {r['macs']:,} ({dense['macs'] / r['macs']:.2f}x) "
                     f"| {100 * r['acc']:.2f} | {ft} | {r['lat_b1']:.2f} ms ({dense['lat_b1'] / r['lat_b1']:.2f}x) "
                     f"| {r['lat_b64']:.2f} ms ({dense['lat_b64'] / r['lat_b64']:.2f}x) |")
    lines += ["", f"universal perturbation, ||delta|| = {a.attack_eps} x mean ||x||, models at "
              f"{a.attack_fraction} of the MACs (fine-tuned):", "| model | active direction | random |",
              "|---|---|---|"]
    lines += [f"| {k} | {100 * v['active']:.1f}% | {100 * v['random']:.1f}% |" for k, v in attacks.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "attacks": attacks, "args": vars(a)}, indent=2))
    _plot(rows, out)


def _plot(rows, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in rows[1:]):
        pts = sorted((r["macs"], r["acc"], r["acc_ft"]) for r in rows if r["method"] == name)
        line = ax.plot([m for m, _, _ in pts], [100 * f for _, _, f in pts], "o-", label=f"{name} (fine-tuned)")
        ax.plot([m for m, _, _ in pts], [100 * b for _, b, _ in pts], "x--", color=line[0].get_color(),
                alpha=0.6, label=f"{name} (before)")
    ax.axhline(100 * rows[0]["acc"], color="k", lw=0.8, label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=120)


if __name__ == "__main__":
    main()

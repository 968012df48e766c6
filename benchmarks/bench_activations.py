"""Activation methods vs weight decomposition on the shipped VGG-16 or ResNet-20 (Fashion-MNIST).

Accuracy vs MACs for RON alone, ASNet alone, Tucker-2 alone and RON on top of Tucker-2 at
``--fractions`` of the dense MACs, before and after the same fine-tune budget
(``--finetune-steps`` steps, distilled from the dense model), measured latency against dense,
and the universal-perturbation attack rate (top active input direction vs a random one of the
same norm) of the dense and the compressed models.

RON on Tucker-2 at a fraction f: Tucker-2 (``oneshot``) at sqrt(f), then RON at sqrt(f) of
that model's MACs. RON picks its start itself (a few candidates scored by the logit error on
held-out calibration samples; the start and the scores are in the JSON rows); on ResNet-20
(``--model resnet20``) the start lies inside the residual stages (blocks reduced jointly, see
``tensorslim.methods._ron_residual``). ``ron@<layer>`` in ``--methods`` runs RON from
``<layer>`` on (skipped where the dense layers before it already exceed the fraction).
ASNet's cut is the latest one that fits the fraction (rank 20, degree 2); where even the
earliest cut does not fit, the row is ASNet at the earliest cut (``"nearest": true``), the
nearest MACs it reaches. The fine-tune budget (steps, batch, data, distillation) is the same
for every method; the rate is ``fine_tune``'s default except for the RON models
(``--ron-lr``, RON's own default: its reduced part is a chain of Linears without BatchNorm).

Full size (the default flags): 1024 calibration images, 2048 ASNet fitting samples,
300 fine-tune steps of batch 128, the whole official test set. A reduced run that fits a
shared CPU (VGG-16):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_activations.py \
        --calib 384 --fit-samples 1024 --finetune-steps 40 --batch 64 --test-samples 1000 \
        --attack-samples 256

(the training subset is then the first 1024 images of the seeded split, fine-tuning sees
40 x 64 of them, accuracies are on the first 1000 official test images). The reduced
ResNet-20 run (512 calibration / fitting / fine-tuning images, attacks at every fraction):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_activations.py --model resnet20 \
        --methods ron asnet tucker ron+tucker --fractions 0.5 0.25 0.125 --calib 512 \
        --fit-samples 512 --finetune-steps 40 --batch 64 --test-samples 1000 \
        --attack-samples 256 --attack-fraction 0.5 0.25 0.125 --rounds 11 --repeats 3 \
        --out benchmarks/results/activations_resnet20

Latencies (batch 1 and batch 64 of random inputs, ``--threads`` threads, fine-tuned models)
are interleaved in one process: every round times each model (median of ``--repeats``
calls) back to back; the speed-up is the median over ``--rounds`` rounds of the per-round
ratio dense / model, so load shared by all models cancels. ``--attack-samples 0`` skips the
universal-perturbation attack; ``--attack-fraction`` names the fractions whose fine-tuned
models are attacked (the dense model always is).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.analysis import universal_attack
from tensorslim.methods._ron_tail import starts
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
    """(model, notes): notes name RON's start (and the scores of the starts it tried) or
    ASNet's cut."""
    if name == "ron" or name.startswith("ron@"):  # ron@<start layer>: RON from that layer on
        start = name.partition("@")[2] or None
        r = ron(dense, x, calibration=cal, target_macs=frac, start_layer=start, progress=False)
        return r.model, _ron_notes(r)
    if name == "asnet":
        try:
            r, nearest = asnet(dense, x, train_loader=fit, target_macs=frac, progress=False), False
        except ValueError as e:  # the earliest cut's dense prefix + head exceed the fraction
            if "not reachable" not in str(e):
                raise
            first = starts(dense, "asnet", blocks=True)[0]
            r, nearest = asnet(dense, x, train_loader=fit, cut=first, progress=False), True
        return r.model, {"cut": r.history["cut"], "rank": r.history["rank"], "nearest": nearest}
    tucker_frac = frac if name == "tucker" else math.sqrt(frac)
    tucker = ts.methods.oneshot(dense, "tucker", x, target_macs=tucker_frac, progress=False).model.eval()
    if name == "tucker":
        return tucker, {}
    r = ron(tucker, x, calibration=cal, target_macs=math.sqrt(frac), progress=False)
    return r.model, _ron_notes(r)


def _ron_notes(r):
    return {"start": r.history["start"], "start_scores": r.history["start_scores"]}


def _interleaved(models, x, rounds, repeats):
    """{name: (median ms, median per-round speed-up over "dense")}: each round times every
    model (median of ``repeats`` calls on ``x``) back to back, so shared load cancels."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            for k, m in models.items():
                calls = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    m(x)
                    calls.append(time.perf_counter() - t)
                times[k].append(statistics.median(calls))
    return {k: (1e3 * statistics.median(v),
                statistics.median(d / t for d, t in zip(times["dense"], v))) for k, v in times.items()}


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
    p.add_argument("--attack-fraction", type=float, nargs="+", default=[0.25])
    p.add_argument("--ron-lr", type=float, default=0.002,
                   help="fine-tune rate of the RON models (ron's own default; others: fine_tune's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/activations")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dense = ts.models.load_pretrained(a.model).eval()
    pad = bool(ts.models.pretrained_info(a.model)["input"]["pad_to_32"])
    loaders = ts.data.make_loaders(a.batch, augment=False, subset=max(a.calib, a.fit_samples),
                                   pad_to_32=pad)
    cal = [x for x, _ in _take(loaders.train, a.calib)]
    fit = _take(loaders.train, a.fit_samples)
    test = _take(loaders.test, a.test_samples)
    x = cal[0][:2]
    xb = torch.randn(64, *x.shape[1:])
    base = ts.count(dense, x[:1]).total_macs
    rows = [{"method": "dense", "fraction": 1.0, "macs": base,
             "acc": evaluate(dense, test)["accuracy"], "acc_ft": None}]
    models = {}
    for frac in a.fractions:
        for name in a.methods:
            t = time.time()
            try:
                m, notes = _compress(name, dense, x, frac, cal, fit)
                m.eval()
            except ValueError as e:  # e.g. a fixed RON start whose dense prefix exceeds the target
                print(f"skipped {name} at {frac}: {e}", flush=True)
                continue
            row = {"method": name, "fraction": frac, "macs": ts.count(m, x[:1]).total_macs,
                   "acc": evaluate(m, test)["accuracy"], **notes}
            tuned = copy.deepcopy(m)
            if a.finetune_steps:
                lr = {"lr": a.ron_lr} if name.startswith("ron") else {}
                fine_tune(tuned, loaders.train, steps=a.finetune_steps, teacher=dense, progress=False, **lr)
            row["acc_ft"] = evaluate(tuned.eval(), test)["accuracy"]
            row["seconds"] = round(time.time() - t, 1)
            rows.append(row)
            models[(name, frac)] = tuned
            print(json.dumps(row), flush=True)
    timed = {"dense": dense, **{f"{n}@{f}": m.eval() for (n, f), m in models.items()}}
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
    for key, inp in (("b1", x[:1]), ("b64", xb)):
        for row, (ms, speed) in zip(rows, _interleaved(timed, inp, a.rounds, a.repeats).values()):
            row[f"lat_{key}"], row[f"speedup_{key}"] = ms, speed
    print("load average before timing:", load, flush=True)
    attacks = _attacks(dense, models, a, fit, test) if a.attack_samples else {}
    for r in rows:
        r["attack"] = attacks.get(_key(r["method"], r["fraction"]))
    _report(rows, attacks, a, load)


def _key(name, frac):
    return "dense" if name == "dense" else f"{name}@{frac}"


def _attacks(dense, models, a, fit, test):
    """Universal-perturbation rates of the dense model and the fine-tuned models at the
    ``--attack-fraction`` fractions, keyed like the timing table (``method@fraction``)."""
    out = {}
    for (name, frac), m in [(("dense", 1.0), dense)] + [
            (k, m) for k, m in models.items() if k[1] in a.attack_fraction]:
        r = universal_attack(m, fit, eps=a.attack_eps, eval_loader=test, max_samples=a.attack_samples)
        out[_key(name, frac)] = {"active": r.active_rate, "random": r.random_rate, "norm": r.norm,
                                 "samples": r.samples}
        print(_key(name, frac), out[_key(name, frac)], flush=True)
    return out


def _report(rows, attacks, a, load) -> None:
    dense = rows[0]
    lines = ["| method | target | start / cut | MACs (x fewer) | acc | acc after fine-tune "
             "| latency b1 (speed-up) | latency b64 (speed-up) | attack: active / random |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ft = "" if r["acc_ft"] is None else f"{100 * r['acc_ft']:.2f}"
        att = "" if not r.get("attack") else \
            f"{100 * r['attack']['active']:.1f}% / {100 * r['attack']['random']:.1f}%"
        lines.append(f"| {r['method']} | {r['fraction']} | {r.get('start') or r.get('cut') or ''} "
                     f"| {r['macs']:,} ({dense['macs'] / r['macs']:.2f}x) "
                     f"| {100 * r['acc']:.2f} | {ft} | {r['lat_b1']:.2f} ms ({r['speedup_b1']:.2f}x) "
                     f"| {r['lat_b64']:.2f} ms ({r['speedup_b64']:.2f}x) | {att} |")
    lines += ["", f"{a.model}; latency: {a.threads} thread(s), median of {a.rounds} interleaved rounds "
              f"(speed-up: median per-round ratio dense / model); load average before timing: {load}"]
    if attacks:
        lines += [f"attack: universal perturbation, ||delta|| = {a.attack_eps} x mean ||x||, share of "
                  f"correctly classified test samples it flips, top active input direction / a random "
                  f"one (fine-tuned models at fractions {a.attack_fraction})"]
    _write(lines, rows, attacks, a)


def _write(lines, rows, attacks, a) -> None:
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

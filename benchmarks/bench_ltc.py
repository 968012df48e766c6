"""Issue 17: LTC (learned Tucker-2 ranks) vs one-shot Tucker-2 (min_error ranks), VBMF-Tucker
and MUSCO at the same MACs and the same total number of SGD steps, on the shipped
Fashion-MNIST models, scored on the official test set (or its first ``--test-subset`` images).

Parts (``--parts``):
  compare  per ``--targets`` MAC fraction, the ``--methods`` among: ``ltc`` (``--lc-steps`` x
           ``--steps-per-lc`` W-step SGD steps distilled from the dense model, then the rest of
           ``--steps`` as distilled fine-tuning), ``ltc_ce`` (the same with label-only W-steps),
           ``oneshot`` (Tucker-2 with min_error ranks + ``--steps`` distilled fine-tuning),
           ``musco`` (3 stages, ``--steps`` / 3 distilled fine-tuning steps per stage);
           ``ltc_ranks`` (a diagnostic, more steps in all: the ranks of the ``ltc`` run applied
           one-shot to the dense weights + ``--steps`` distilled fine-tuning); ``vbmf``:
           EVBMF ranks (one-shot) + fine-tuning at their own MACs, and LTC at those MACs.
           Also the C-step time against the SGD time.
  layers   the seed's layer analysis (its Tables 2-3) for the ranks LTC learned at the first
           target: per layer its learned ranks, MACs before/after, and the test accuracy of the
           dense model with only that layer decomposed at them (HOSVD of the trained weights,
           BN re-calibrated, no training); then all but the first layer, then all; then the LTC
           model itself.
  sweep    lam -> rank distribution per layer and lam -> (accuracy, params, MACs) of the
           C-step projection of the trained weights (mu = 1, BN re-calibrated, no training),
           with PNG plots under benchmarks/results/ltc/.

Every method uses the same batch size, learning rate for fine-tuning, BN re-calibration
(50 batches) and distillation (alpha 0.5, T 4, from the dense model). The full-size run is e.g.

    python benchmarks/bench_ltc.py --model vgg16 --targets 0.25,0.125 --steps 3000 \\
        --lc-steps 10 --steps-per-lc 200 --test-subset 0

The runs reported in the issue note were scaled down to the CPU budget (one shared core):
200 SGD steps per method (LTC: 5 LC steps x 30 W-step steps + 50 fine-tuning steps, mu0
0.02, growth 3.3; MUSCO: 3 x 66), the first 2,000 official test images, target 4x only:

    python benchmarks/bench_ltc.py --model vgg16 --parts compare,layers --targets 0.25 \\
        --methods ltc,ltc_ce,oneshot,musco --steps 200 --lc-steps 5 --steps-per-lc 30 \\
        --mu0 0.02 --mu-growth 3.3 --test-subset 2000 --out benchmarks/results/ltc/compare4x_vgg16.json
    (the same with --model resnet20 --out benchmarks/results/ltc/compare4x_resnet20.json)
    python benchmarks/bench_ltc.py --parts sweep --lams 30,50,75,100,150,200,300,500,800,1200 \\
        --test-subset 0 --out benchmarks/results/ltc/sweep_vgg16.json   (the C-step on the dense
        weights, projected, BN re-estimated, no training; full test set)

``--prices`` runs ``ltc`` once per C-step rank price (``weight``: plain weight-space error,
the earlier runs; ``relative``, ``fisher``, ``measured``: see
``tensorslim.methods._ltc_price``); the price runs of the issue note used the same scaled-down
settings with ``--methods ltc --prices relative`` and wrote ``compare4x_price_{model}.json``
(the other methods' rows at those settings are in ``compare4x_{model}.json``).

The ResNet-20 follow-ups use the same scaled-down settings (200 steps, 2,000 test images,
``--parts compare --steps 200 --mu0 0.02 --test-subset 2000``): ``--targets 0.125 --methods
ltc,oneshot,musco --lc-steps 5 --steps-per-lc 30 --mu-growth 3.3`` -> ``compare8x_resnet20.json``;
``--methods vbmf`` (same LC settings) -> ``compare_vbmf_resnet20.json`` (pure EVBMF ranks and
LTC at their MACs), with ``--vbmf-factor 0.8`` -> ``compare_f08_vbmf_resnet20.json``; the schedule
variant ``--methods ltc --lc-steps 4 --steps-per-lc 25`` (100 penalised W-steps, 100 free
fine-tuning steps) at ``--mu-growth 4.92`` (the same final mu as 5 x 3.3) ->
``compare{4x,8x}_schedule_resnet20.json`` (targets 0.25, 0.125), at ``--mu-growth 3.3`` ->
``compare4x_schedule_g33_resnet20.json``; with ``--seed 1`` the default and the variant schedule
-> ``compare4x_schedule_ref5x30_seed1_resnet20.json``, ``compare4x_schedule_seed1_resnet20.json``.
The session-8 runs at 3x the budget (full test set): ``--parts compare --steps 600 --lc-steps 5
--steps-per-lc 90 --mu0 0.02 --mu-growth 3.3 --test-subset 0`` with ``--model vgg16 --targets
0.125,0.25 --methods ltc,oneshot,musco`` -> ``full600_vgg16.json``; ``--model resnet20`` with
``--targets 0.125 --methods ltc,oneshot`` -> ``full600_resnet20_8x.json``, ``--targets 0.25
--methods ltc,oneshot,musco`` -> ``full600_resnet20_4x.json``, ``--targets 0.125 --methods musco``
-> ``full600_musco_resnet20_8x.json``.
The ``*_ltcranks_*.json`` files hold the diagnostic "an LTC run's ranks applied one-shot + 200
distilled steps" (what ``ltc_ranks`` does, here taken from the saved ranks of the run named in
their ``source`` instead of re-running LTC).

Every run above used ``pairs="all", rank_error="exact"`` (the LTC defaults then; ``--pairs all
--rank-error exact`` today). The rank-drift study (session 7) ran LTC alone with the settings
above (5 x 30 + 50, 2,000 test images) from a small script calling ``ltc`` as ``run_ltc`` does,
and saved the per-LC-step history: ``drift_*.json`` (``kw``: the settings changed; ``reprice``
and ``freeze_ranks_after`` were trial options that were not kept). The full-test-set rows
(``--test-subset 0``, 200 steps, the new defaults ``pairs="proportional", rank_error="bound"``):

    python benchmarks/bench_ltc.py --model M --parts compare --targets 0.125,0.25 \
        --methods oneshot,musco --steps 200 --test-subset 0 --out .../full_baselines_M.json
    python benchmarks/bench_ltc.py --model M --parts compare --targets 0.125,0.25 --methods ltc \
        --steps 200 --lc-steps 5 --steps-per-lc 30 --mu0 0.02 --mu-growth 3.3 --test-subset 0 \
        --out .../full_ltc_M.json
    (the same with --methods vbmf and no --targets -> full_vbmf_M.json; with --targets 0.125
    --pairs all --rank-error exact -> full_ltc_old_allexact_M.json, the earlier C-step)
``full_ltcranks_resnet20_8x.json``: the diagnostic above for the 8x row of full_ltc_resnet20.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.methods import musco, oneshot
from tensorslim.methods.ltc import ltc
from tensorslim.train import evaluate

OUT = Path(__file__).resolve().parent / "results" / "ltc"


class Ctx:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dense = ts.models.load_pretrained(a.model)
        pad = ts.models.pretrained_info(a.model).get("input", {}).get("pad_to_32", False)
        self.loaders = make_loaders(a.batch_size, seed=a.seed, pad_to_32=pad)
        test = self.loaders.test
        if a.test_subset:
            test = TensorBatchLoader(test.dataset.subset(torch.arange(a.test_subset)), 500)
        self.test = test
        self.x1 = torch.zeros(1, 1, 32 if pad else 28, 32 if pad else 28)
        self.macs0 = ts.count(self.dense, self.x1).total_macs
        self.acc0 = self.acc(self.dense)
        self.targets = [float(t) for t in a.targets.split(",")]
        self.ltc_runs: dict = {}  # target -> the LTCResult of the KD run (for the layer analysis)
        print(f"dense {a.model}: test accuracy {self.acc0:.4f}, MACs {self.macs0:,d}", flush=True)

    def acc(self, model: torch.nn.Module) -> float:
        return evaluate(model.eval(), self.test)["accuracy"]

    def row(self, label: str, model: torch.nn.Module, steps: int, t0: float, **extra) -> dict:
        c = ts.count(model, self.x1)
        r = {"model": self.a.model, "method": label, "macs_ratio": c.total_macs / self.macs0,
             "params": c.total_params, "acc": self.acc(model), "steps": steps,
             "wall_s": round(time.perf_counter() - t0, 1), **extra}
        print(json.dumps(r), flush=True)
        return r


def run_ltc(c: Ctx, target: float, label: str, wstep_distill: bool = True,
            price: str | None = None) -> dict:
    a = c.a
    price = price or a.prices.split(",")[0]
    w_steps = a.lc_steps * a.steps_per_lc
    t0 = time.perf_counter()
    res = ltc(c.dense, c.x1, train_loader=c.loaders.train, target_macs=target, lc_steps=a.lc_steps,
              steps_per_lc_step=a.steps_per_lc, mu0=a.mu0, mu_growth=a.mu_growth, lr=a.ltc_lr,
              finetune_steps=a.steps - w_steps, finetune_lr=a.lr, seed=a.seed,
              wstep_distill=wstep_distill, price=price, pairs=a.pairs, rank_error=a.rank_error,
              progress=False)
    if wstep_distill:
        c.ltc_runs.setdefault(target, res)
    hist = res.history
    cstep = sum(h["cstep_s"] for h in hist) / len(hist)
    sgd = sum(h["wstep_s"] for h in hist) / (len(hist) * max(1, a.steps_per_lc))
    return c.row(f"{label} [price {price}]", res.model, a.steps, t0, cstep_s=round(cstep, 3),
                 sgd_step_s=round(sgd, 4), cstep_over_lc_step=round(cstep / (sgd * a.steps_per_lc), 4),
                 final_rel_dist=round(res.history[-1]["rel_dist"], 4), price=price,
                 price_weights=res.initial.get("price_weights"), ranks=res.history[-1]["ranks"],
                 initial_ranks=res.initial["ranks"], pairs=a.pairs, rank_error=a.rank_error,
                 history=[{k: h[k] for k in ("step", "mu", "lam", "ranks", "cost_ratio", "rel_dist")}
                          for h in hist])


def run_oneshot(c: Ctx, label: str, **goal) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(c.a.seed)
    res = oneshot(c.dense, "tucker", c.x1, train_loader=c.loaders.train, finetune_steps=c.a.steps,
                  finetune_lr=c.a.lr, progress=False, **goal)
    c.oneshot_ranks = {s.name: s.rank for s in res.plan.layers}
    return c.row(label, res.model, c.a.steps, t0)


def part_compare(c: Ctx) -> list[dict]:
    a, rows = c.a, []
    methods = a.methods.split(",")
    known = ("ltc", "ltc_ce", "oneshot", "musco", "ltc_ranks", "vbmf")
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(known)}")
    for target in c.targets:
        x = f"{1 / target:.0f}x"
        if "ltc" in methods:  # one run per --prices entry (the first one feeds the layer analysis)
            for price in a.prices.split(","):
                rows.append(run_ltc(c, target, f"LTC, KD W-steps {x}", price=price))
        if "ltc_ce" in methods:
            rows.append(run_ltc(c, target, f"LTC, label-only W-steps {x}", wstep_distill=False))
        if "oneshot" in methods:
            rows.append(run_oneshot(c, f"one-shot Tucker-2 min_error + KD {x}", target_macs=target,
                                    rank_rule="min_error"))
            rows[-1]["ranks"] = c.oneshot_ranks
        if "musco" in methods:
            t0 = time.perf_counter()
            res = musco(c.dense, "tucker", c.x1, train_loader=c.loaders.train, stages=3,
                        finetune_steps_per_stage=a.steps // 3, target_macs=target,
                        finetune_lr=a.lr, seed=a.seed, progress=False)
            rows.append(c.row(f"MUSCO 3 stages {x}", res.model, 3 * (a.steps // 3), t0))
        if "ltc_ranks" in methods:
            if target not in c.ltc_runs:
                rows.append(run_ltc(c, target, f"LTC, KD W-steps {x}"))
            rows.append(run_oneshot(c, f"LTC's ranks, one-shot + KD {x} (diagnostic)",
                                    plan=c.ltc_runs[target].plan))
    if "vbmf" in methods:
        f = a.vbmf_factor  # 1.0: the pure EVBMF ranks; < 1: MUSCO's softening R - f (R - R_vbmf)
        plan = ts.make_plan(c.dense, "tucker", c.x1, rank_rule="vbmf", vbmf_factor=f)
        name = "VBMF-Tucker" if f == 1.0 else f"VBMF-Tucker (factor {f:g})"
        rows.append(run_oneshot(c, f"{name} ({1 / plan.macs_ratio:.2f}x)", plan=plan))
        rows[-1]["ranks"] = c.oneshot_ranks
        rows.append(run_ltc(c, plan.macs_ratio, f"LTC at the VBMF MACs ({1 / plan.macs_ratio:.2f}x)"))
    return rows


def _only(plan: ts.CompressionPlan, names: set[str]) -> ts.CompressionPlan:
    """``plan`` with every layer outside ``names`` kept dense."""
    from dataclasses import replace

    keep = [s if s.name in names or not s.compressed else
            replace(s, method="keep", rank=None, options={}, error=None, reason="layer analysis",
                    params_after=s.params_before, macs_after=s.macs_before)
            for s in plan.layers]
    return plan.with_layers(tuple(keep))


def part_layers(c: Ctx) -> list[dict]:
    """The seed's layer analysis for LTC's ranks at the first target (see the module doc)."""
    from tensorslim.calibrate import recalibrate_bn

    target = c.targets[0]
    if target not in c.ltc_runs:
        run_ltc(c, target, f"LTC, KD W-steps {1 / target:.0f}x")
    res = c.ltc_runs[target]
    names = [s.name for s in res.plan.compressed]
    groups = [(n, {n}) for n in names]
    groups += [("all but the first", set(names[1:])), ("all", set(names))]
    rows = []
    for label, group in groups:
        t0 = time.perf_counter()
        sub = _only(res.plan, group)
        model = ts.compress(copy.deepcopy(c.dense), sub, progress=False)  # compress works in place
        c.loaders.train.set_epoch(9_999)
        recalibrate_bn(model, c.loaders.train, steps=20)
        spec = res.plan[label] if label in group and len(group) == 1 else None
        extra = {"layer": label, "rank": None if spec is None else spec.rank,
                 "layer_macs_before": None if spec is None else spec.macs_before,
                 "layer_macs_after": None if spec is None else spec.macs_after}
        rows.append(c.row(f"layers: {label}", model, 0, t0, **extra))
    rows.append(c.row("layers: the LTC model (trained)", res.model, c.a.steps, time.perf_counter(),
                      layer="LTC model"))
    return rows


def part_sweep(c: Ctx) -> list[dict]:
    """C-step of the trained weights for a range of lam (mu = 1): ranks, MACs, accuracy."""
    from tensorslim.calibrate import recalibrate_bn

    rows = []
    for lam in (float(v) for v in c.a.lams.split(",")):
        t0 = time.perf_counter()
        res = ltc(c.dense, c.x1, train_loader=c.loaders.train, lam=lam, mu0=1.0, lc_steps=1,
                  steps_per_lc_step=0, bn_steps=0, progress=False)
        c.loaders.train.set_epoch(9_999)
        recalibrate_bn(res.model, c.loaders.train, steps=20)
        ranks = res.initial["ranks"]
        rows.append(c.row(f"lam {lam:g}", res.model, 0, t0, lam=lam, ranks=ranks))
    _plot(rows, c.dense)
    return rows


def _full_rank(weight: torch.Tensor, pair: bool) -> float:
    """sqrt(R_in R_out) of a Tucker-2 kernel (the ranks of its channel unfoldings), or the
    matrix rank bound min(T, S k) of an SVD layer."""
    t, s, k = weight.shape[0], weight.shape[1], weight[0, 0].numel()
    return (min(s, t * k) * min(t, s * k)) ** 0.5 if pair else min(t, s * k)


def _plot(rows: list[dict], dense: torch.nn.Module) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    names = list(rows[0]["ranks"])
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, r in enumerate(rows):
        vals = [1.0 if v is None else
                ((v[0] * v[1]) ** 0.5 if isinstance(v, list) else v)
                / _full_rank(dense.get_submodule(n).weight, isinstance(v, list))
                for n, v in r["ranks"].items()]
        ax.plot(range(len(names)), vals, marker="o", label=f"lam={r['lam']:g}")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax.set_ylabel("rank / full rank\n(Tucker-2: sqrt(r_in r_out); 1 = dense)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "lam_ranks.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    lams = [r["lam"] for r in rows]
    ax.semilogx(lams, [r["acc"] for r in rows], marker="o", label="accuracy (projected, BN re-cal.)")
    ax.semilogx(lams, [r["macs_ratio"] for r in rows], marker="s", label="MACs ratio")
    ax.semilogx(lams, [r["params"] / rows[0]["params"] for r in rows], marker="^",
                label="params ratio (vs smallest lam)")
    ax.set_xlabel("lam")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "lam_acc_macs.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--parts", default="compare,sweep")
    p.add_argument("--targets", default="0.25,0.125")
    p.add_argument("--methods", default="ltc,ltc_ce,oneshot,musco,vbmf")
    p.add_argument("--steps", type=int, default=3000, help="total SGD steps per method")
    p.add_argument("--lc-steps", type=int, default=10)
    p.add_argument("--steps-per-lc", type=int, default=200)
    p.add_argument("--mu0", type=float, default=0.02)
    p.add_argument("--mu-growth", type=float, default=1.6)
    p.add_argument("--ltc-lr", type=float, default=0.01)
    p.add_argument("--prices", default="relative",
                   help="LTC C-step rank prices to run (comma list: weight, relative, fisher, measured)")
    p.add_argument("--pairs", default="proportional", help="LTC Tucker-2 candidates: proportional, all")
    p.add_argument("--rank-error", default="bound", help="LTC rank-choice error: bound, exact")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--vbmf-factor", type=float, default=1.0,
                   help="vbmf method: 1.0 = pure EVBMF ranks; f < 1 keeps R - f (R - R_vbmf)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-subset", type=int, default=0, help="0: the full official test set")
    p.add_argument("--lams", default="0.01,0.1,0.3,1,3,10,30")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT / "results.json"))
    a = p.parse_args()
    c = Ctx(a)
    rows = []
    for part in a.parts.split(","):
        rows += {"compare": part_compare, "layers": part_layers, "sweep": part_sweep}[part](c)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "dense_acc": c.acc0, "rows": rows}, indent=1))
    print(f"{'method':48s} {'MACs':>7s} {'params':>9s} {'acc':>7s} {'steps':>6s}")
    for r in rows:
        print(f"{r['method'][:48]:48s} {r['macs_ratio']:7.4f} {r['params']:9,d} {r['acc']:7.4f} {r['steps']:6d}")
    layer_rows = [r for r in rows if r.get("layer_macs_before")]
    if layer_rows:
        print(f"\n{'layer':24s} {'ranks':>10s} {'MACs before':>12s} {'after':>10s} {'model MACs':>10s} {'acc':>7s}")
        for r in layer_rows:
            print(f"{r['layer'][:24]:24s} {str(r['rank']):>10s} {r['layer_macs_before']:12,d} "
                  f"{r['layer_macs_after']:10,d} {r['macs_ratio']:10.4f} {r['acc']:7.4f}")


if __name__ == "__main__":
    main()

"""Issue-4 experiments on the shipped Fashion-MNIST VGG-16 (one run, one table per part).

Parts (``--parts``, comma separated):
  musco  multi-stage (MUSCO, ``--stages`` stages; ranks EVBMF-shaped or heading for the one-shot
         plan's, ``--musco-guides``) vs one-shot at the same final MACs
         (``--targets``, e.g. 0.25 and 0.125 = 4x and 8x fewer), the SAME total number of
         fine-tuning steps (one-shot: all of them after compression; MUSCO: split evenly over
         the stages), Tucker-2, distillation from the dense model.
  vbmf   EVBMF-selected ranks vs constant-rate ranks at equal MACs (the constant rate found by
         bisection so its MACs match the VBMF plan's), accuracy before and after fine-tuning.
  rules  uniform vs min_error global budget at the same target, before and after fine-tuning.
  epc    plain CP vs CPD-EPC at an aggressive MAC target: accuracy before/after fine-tuning.

    python benchmarks/bench_musco.py --parts musco --targets 0.25,0.125 --steps 900
    python benchmarks/bench_musco.py --parts vbmf,rules,epc --steps 300
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.calibrate import recalibrate_bn
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.models.checkpoint import WEIGHTS_DIR, load_checkpoint
from tensorslim.train import evaluate, fine_tune


class Ctx:
    def __init__(self, args):
        self.args = args
        self.dense = load_checkpoint(args.model, args.checkpoint)
        self.loaders = make_loaders(args.batch_size, seed=args.seed, augment=True)
        test = self.loaders.test
        if args.test_subset:
            test = TensorBatchLoader(test.dataset.subset(torch.arange(args.test_subset)), 500)
        self.test = test
        self.x1 = torch.randn(1, 1, 28, 28)
        self.macs0 = ts.count(self.dense, self.x1).total_macs
        self.acc0 = evaluate(self.dense, test)["accuracy"]

    def acc(self, model) -> float:
        return evaluate(model.eval(), self.test)["accuracy"]

    def macs(self, model) -> float:
        return ts.count(model, self.x1).total_macs / self.macs0

    def tune(self, model, steps: int):
        torch.manual_seed(self.args.seed)
        fine_tune(model, self.loaders.train, steps=steps, lr=self.args.lr, teacher=copy.deepcopy(self.dense).eval(),
                  progress=True, log_every=0)
        return model.eval()

    def recalibrate(self, model):
        if self.args.bn_steps:
            self.loaders.train.set_epoch(9_999)
            recalibrate_bn(model, self.loaders.train, steps=self.args.bn_steps)
        return model.eval()

    def plan_and_tune(self, label: str, plan, steps: int) -> dict:
        model = ts.compress(copy.deepcopy(self.dense), plan, progress=False)
        before = self.acc(model)
        recal = self.acc(self.recalibrate(model))
        after = self.acc(self.tune(model, steps))
        row = {"label": label, "macs": self.macs(model), "acc_before": before, "acc_recal": recal,
               "acc_after": after, "steps": steps}
        print(row, flush=True)
        return row


def part_musco(c: Ctx) -> list[dict]:
    from tensorslim.methods.musco import musco

    a, rows = c.args, []
    for target in (float(t) for t in a.targets.split(",")):
        plan = ts.make_plan(c.dense, "tucker", c.x1, target_macs=target, rank_rule=a.rank_rule)
        rows.append(c.plan_and_tune(f"one-shot tucker {1 / target:.0f}x", plan, a.steps))
        for guide in a.musco_guides.split(","):
            if guide not in ("vbmf", "oneshot"):
                raise SystemExit(f"unknown --musco-guides entry {guide!r}; known: vbmf, oneshot")
            # oneshot: the stages head for the one-shot plan's ranks (same final architecture)
            ranks = {s.name: s.rank for s in plan.compressed} if guide == "oneshot" else "vbmf"
            goal = plan.macs_ratio if guide == "oneshot" else target
            t0 = time.perf_counter()
            res = musco(c.dense, "tucker", c.x1, train_loader=c.loaders.train, stages=a.stages,
                        finetune_steps_per_stage=a.steps // a.stages, target_macs=goal,
                        stage_ranks=ranks, seed=a.seed, finetune_lr=a.lr, bn_steps=a.bn_steps,
                        progress=True)
            row = {"label": f"MUSCO tucker {1 / target:.0f}x, {res.stages_done} stages, "
                            f"{'to the one-shot ranks' if guide == 'oneshot' else 'EVBMF-shaped ranks'}",
                   "macs": c.macs(res.model), "acc_before": None, "acc_recal": None,
                   "acc_after": c.acc(res.model), "steps": a.steps,
                   "stage_macs": [h.get("macs_ratio", h.get("macs")) for h in res.history],
                   "stop_reason": res.stop_reason, "wall_s": round(time.perf_counter() - t0, 1)}
            print(row, flush=True)
            rows.append(row)
    return rows


def _constant_plan_matching(c: Ctx, macs: float):
    """Constant-rate plan whose MACs are closest to ``macs`` (bisection on the rate)."""
    lo, hi, best = 1.0, 400.0, None
    for _ in range(30):
        rate = (lo * hi) ** 0.5
        plan = ts.make_plan(c.dense, "tucker", c.x1, rank_rule="constant", rate=rate)
        ratio = plan.macs_after / plan.macs_before
        if best is None or abs(ratio - macs) < abs(best[1] - macs):
            best = (plan, ratio, rate)
        lo, hi = (rate, hi) if ratio > macs else (lo, rate)
    return best


def part_vbmf(c: Ctx) -> list[dict]:
    a, rows = c.args, []
    for factor in (float(f) for f in a.vbmf_factors.split(",")):
        vplan = ts.make_plan(c.dense, "tucker", c.x1, rank_rule="vbmf", vbmf_factor=factor)
        ratio = vplan.macs_after / vplan.macs_before
        cplan, cratio, rate = _constant_plan_matching(c, ratio)
        rows.append(c.plan_and_tune(f"vbmf factor {factor} (MACs {ratio:.3f})", vplan, a.steps))
        rows.append(c.plan_and_tune(f"constant rate {rate:.2f} (MACs {cratio:.3f})", cplan, a.steps))
    return rows


def part_rules(c: Ctx) -> list[dict]:
    a, rows = c.args, []
    for rule in ("uniform", "min_error"):
        for target in (float(t) for t in a.targets.split(",")):
            plan = ts.make_plan(c.dense, "tucker", c.x1, target_macs=target, rank_rule=rule)
            rows.append(c.plan_and_tune(f"tucker {rule} {1 / target:.0f}x", plan, a.steps))
    return rows


def part_epc(c: Ctx) -> list[dict]:
    a, rows = c.args, []
    for epc in (False, True):
        plan = ts.make_plan(c.dense, "cp", c.x1, target_macs=a.epc_target, cp_epc=epc)
        rows.append(c.plan_and_tune(f"cp{'-epc' if epc else ''} {1 / a.epc_target:.0f}x", plan, a.steps))
    return rows


PARTS = {"musco": part_musco, "vbmf": part_vbmf, "rules": part_rules, "epc": part_epc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--checkpoint", default=str(WEIGHTS_DIR))
    p.add_argument("--parts", default="musco,vbmf,rules,epc")
    p.add_argument("--targets", default="0.25,0.125")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--rank-rule", default="uniform", help="one-shot rank rule for the musco part")
    p.add_argument("--musco-guides", default="vbmf,oneshot",
                   help="MUSCO runs per target: vbmf (EVBMF-shaped ranks meeting the target), oneshot "
                        "(stages heading for the one-shot plan's ranks: the same final architecture)")
    p.add_argument("--vbmf-factors", default="0.6")
    p.add_argument("--epc-target", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=900, help="total fine-tune steps per run")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bn-steps", type=int, default=50,
                   help="BatchNorm re-calibration batches after each decomposition (0 = off)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_musco")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = Ctx(args)
    print(f"dense: acc {c.acc0:.4f}, MACs {c.macs0:,}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; known: {', '.join(PARTS)}")
        rows = PARTS[part](c)
        lines = [f"## {part} (dense acc {c.acc0:.4f}, BN re-calibration {args.bn_steps} batches)", "",
                 "| run | MACs kept | acc before FT | acc after BN re-cal. | acc after FT | FT steps |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            b, rc = ("—" if r.get(k) is None else f"{r[k]:.4f}" for k in ("acc_before", "acc_recal"))
            lines.append(f"| {r['label']} | {r['macs']:.4f} | {b} | {rc} | {r['acc_after']:.4f} | {r['steps']} |")
        table = "\n".join(lines)
        print(table, flush=True)
        (out / f"{part}.md").write_text(table + "\n")
        (out / f"{part}.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()

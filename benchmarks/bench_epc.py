"""Plain CP (CP-ALS) vs CPD-EPC (Phan et al. 2020) on the conv kernels of a trained VGG-16.

    python benchmarks/bench_epc.py [--checkpoint DIR | --random-init] [--layers features.10,...]
                                   [--rank-frac 0.5] [--png runs/bench_epc/intensities.png]

For every chosen 3x3 conv (kernel T x S x 3 x 3, float64) at CP rank ``round(rank_frac *
min(T, S))``: ``cp_als(w, R)`` (library defaults), then ``cp_epc(w, R, init=<that ALS result>)``
with the default bound delta = the ALS error. The table gives, per layer and method, the
relative error ||W - W^|| / ||W||, the sensitivity (``tensorslim.tensor.sensitivity``, default
form: sum_n tr(Hadamard_{k != n} A_k^T A_k), weights spread evenly), the largest and smallest
component intensity (Frobenius norm of a rank-1 term) and the time. The PNG shows the sorted
intensities of both (log scale), one panel per layer, like the figure of the seed talk.
By default the shipped trained weights (``tensorslim/weights/vgg16.safetensors``) are used;
``--random-init`` uses an untrained ``vgg16(width=0.25)`` (development only).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from tensorslim.tensor import component_intensities, cp_als, cp_epc, sensitivity

DEFAULT_LAYERS = "features.10,features.17,features.24,features.30,features.40"


def load_model(checkpoint: str | None) -> nn.Module:
    if checkpoint:
        from tensorslim.models.checkpoint import load_checkpoint

        return load_checkpoint("vgg16", checkpoint)
    from tensorslim.models import create

    torch.manual_seed(0)
    return create("vgg16", width=0.25).eval()


def run_layer(name: str, conv: nn.Conv2d, frac: float) -> dict:
    w = conv.weight.detach().double()
    rank = max(1, round(frac * min(w.shape[0], w.shape[1])))
    t0 = time.perf_counter()
    als = cp_als(w, rank)
    t1 = time.perf_counter()
    epc = cp_epc(w, rank, init=als)
    t2 = time.perf_counter()
    out = {"name": name, "shape": tuple(w.shape), "rank": rank, "cps": {}}
    for label, cp, secs in (("CP-ALS", als, t1 - t0), ("CPD-EPC", epc, t2 - t1)):
        err = float((w - cp.to_tensor()).norm() / w.norm())
        lam = component_intensities(cp)
        out["cps"][label] = dict(err=err, ss=sensitivity(cp), hi=float(lam[0]), lo=float(lam[-1]),
                                 secs=secs, sweeps=len(cp.errors), lam=lam)
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'layer':12s} {'kernel':>16s} {'R':>4s} {'method':8s} {'rel.err':>9s} "
            f"{'sensitivity':>12s} {'max int.':>10s} {'min int.':>10s} {'sweeps':>6s} {'time s':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for label, c in r["cps"].items():
            kernel = "x".join(map(str, r["shape"]))
            print(f"{r['name']:12s} {kernel:>16s} {r['rank']:4d} {label:8s} {c['err']:9.5f} "
                  f"{c['ss']:12.4g} {c['hi']:10.4g} {c['lo']:10.3g} {c['sweeps']:6d} {c['secs']:7.1f}")
        a, e = r["cps"]["CP-ALS"], r["cps"]["CPD-EPC"]
        print(f"{'':12s} {'':>16s} {'':4s} {'ratio':8s} {e['err'] / a['err']:9.5f} "
              f"{e['ss'] / a['ss']:12.4g} {e['hi'] / a['hi']:10.4g}")


def save_png(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for label, style in (("CP-ALS", "-"), ("CPD-EPC", "--")):
            lam = r["cps"][label]["lam"].clamp_min(1e-12).numpy()
            ax.semilogy(range(1, len(lam) + 1), lam, style, label=label)
        ax.set_title(f"{r['name']} {r['shape'][0]}x{r['shape'][1]}x3x3, R={r['rank']}", fontsize=9)
        ax.set_xlabel("component (sorted)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("intensity (Frobenius norm of term)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from tensorslim.models.checkpoint import WEIGHTS_DIR

    p.add_argument("--checkpoint", default=str(WEIGHTS_DIR), help="folder with vgg16.safetensors + vgg16.json (default: the shipped weights)")
    p.add_argument("--random-init", action="store_true", help="untrained vgg16(width=0.25) instead (development only)")
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated conv names")
    p.add_argument("--rank-frac", type=float, default=0.5, help="CP rank = frac * min(T, S)")
    p.add_argument("--png", default="runs/bench_epc/intensities.png")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    if args.random_init:
        args.checkpoint = None
    model = load_model(args.checkpoint)
    modules = dict(model.named_modules())
    rows = []
    for name in [n.strip() for n in args.layers.split(",") if n.strip()]:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise SystemExit(f"{name!r} is not a Conv2d of vgg16; convs: "
                             f"{[n for n, m in modules.items() if isinstance(m, nn.Conv2d)]}")
        rows.append(run_layer(name, conv, args.rank_frac))
    source = f"trained checkpoint {args.checkpoint}" if args.checkpoint else "random init (dev)"
    print(f"vgg16(width=0.25), {source}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print_table(rows)
    save_png(rows, Path(args.png), f"CP-ALS vs CPD-EPC, sorted intensities\n{source}")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

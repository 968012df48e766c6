"""TensorNet experiments (Novikov et al. 2015; Garipov et al. 2016) on real Fashion-MNIST.

1. ``fc``: a two-layer FC net 784 -> 625 -> 10 whose hidden layer is a TT layer (modes
   [7,4,7,4] x [5,5,5,5], t3f's Glorot init) of TT-rank 1, 2, 4, 8, 16, a matrix-rank layer
   ("MR": Linear(784, r) then Linear(r, 625)) or dense, trained from scratch: test accuracy vs
   parameters of the hidden layer (plot ``fc_accuracy_vs_params.png``); then t3f's tutorial
   check: TT-SVD of the trained dense hidden layer at rank 16, accuracy before and after
   fine-tuning.
2. ``head``: a small conv net with a 1024-wide FC head (conv 1->16, conv 16->32, FC 1568 ->
   1024 -> 10) trained dense, its first FC layer TT-compressed through ``ts.make_plan(...,
   "tt", ranks=r, include=["fc1"], objective="params")`` at several ranks, then fine-tuned.
3. ``ultimate``: conv-TT-fc and TT-conv-TT-fc versions of that net (TTConv2d for conv2,
   TTLinear for fc1) trained from scratch at several ranks vs the dense net.
4. ``speed``: TTConv2d vs nn.Conv2d (measured speed-up / MAC-predicted speed-up) and the
   training step (forward + backward) vs the forward of a TT layer.

Optimiser: AdamW (lr 1e-3, no weight decay, cosine), batch 64, no augmentation. The defaults are
a reduced CPU run (``--subset`` training images, ``--epochs``, ``--finetune``, ``--test-images``):
pass ``--subset 0 --epochs 3 --finetune 2 --test-images 0`` for the full-size t3f setting (55,000
training images; the official 10,000 test images). The README's tables give the exact flags of
the run they come from.

    OMP_NUM_THREADS=1 python benchmarks/bench_tensornet.py                 # all, reduced
    OMP_NUM_THREADS=1 python benchmarks/bench_tensornet.py --parts fc --subset 0 --epochs 3
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers import TTConv2d, TTLinear
from tensorslim.train import evaluate, train

OUT = Path(__file__).parent / "results" / "tensornet"
IN_MODES, OUT_MODES = (7, 4, 7, 4), (5, 5, 5, 5)


# -- models -------------------------------------------------------------------------------------
def fc_net(kind: str, rank: int = 0) -> nn.Sequential:
    """784 -> hidden 625 (``tt`` | ``mr`` | ``dense``) -> ReLU -> 10."""
    if kind == "tt":
        hidden: nn.Module = TTLinear(784, 625, IN_MODES, OUT_MODES, rank, init="glorot")
    elif kind == "mr":
        hidden = nn.Sequential(nn.Linear(784, rank, bias=False), nn.Linear(rank, 625))
    else:
        hidden = nn.Linear(784, 625)
    return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Linear(625, 10))


class ConvNet(nn.Module):
    """conv 1->16 (3x3) -> pool -> conv 16->32 (3x3) -> pool -> FC 1568 -> 1024 -> 10."""

    def __init__(self, conv_rank: int = 0, fc_rank: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = (TTConv2d(16, 32, 3, conv_rank, padding=1, in_modes=(4, 4), out_modes=(4, 8))
                      if conv_rank else nn.Conv2d(16, 32, 3, padding=1))
        self.fc1 = (TTLinear(1568, 1024, (8, 14, 14), (8, 8, 16), fc_rank, init="glorot")
                    if fc_rank else nn.Linear(1568, 1024))
        self.fc2 = nn.Linear(1024, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -- helpers ------------------------------------------------------------------------------------
def fit(model: nn.Module, loaders, epochs: int, seed: int = 0) -> float:
    """Train (AdamW, cosine) and return the test accuracy."""
    if epochs > 0:
        train(model, loaders.train, epochs=epochs, optimizer="adamw", lr=1e-3, weight_decay=0.0,
              progress=False, seed=seed)
    return evaluate(model, loaders.test)["accuracy"]


def table(title: str, head: list[str], rows: list[list]) -> str:
    lines = [f"\n{title}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# -- 1. the TensorNet FC study ------------------------------------------------------------------
def part_fc(loaders, args) -> str:
    rows, curves = [], {"TT": [], "MR": [], "dense": []}
    runs = [("tt", r) for r in (1, 2, 4, 8, 16)] + [("mr", r) for r in (1, 5, 10, 25, 50)] + [("dense", 0)]
    dense_model = None
    for kind, r in runs:
        torch.manual_seed(0)
        model = fc_net(kind, r)
        t0 = time.perf_counter()
        acc = fit(model, loaders, args.epochs)
        hp = n_params(model[1])
        name = {"tt": f"TT{r}", "mr": f"MR{r}", "dense": "dense"}[kind]
        rows.append([name, f"{hp:,d}", f"{490_000 / (hp - 625):.0f}x", f"{acc:.4f}", f"{time.perf_counter() - t0:.0f}"])
        curves[{"tt": "TT", "mr": "MR", "dense": "dense"}[kind]].append((hp, acc))
        if kind == "dense":
            dense_model = model
    text = table(f"FC 784->625->10 from scratch ({args.epochs} epochs)",
                 ["hidden layer", "params (with bias)", "weight compression", "test acc", "s"], rows)
    # t3f tutorial: TT-SVD of the trained dense hidden layer at rank 16, then fine-tune
    tt = TTLinear.from_linear(dense_model[1], 16, in_modes=IN_MODES, out_modes=OUT_MODES)
    model = copy.deepcopy(dense_model)
    model[1] = tt
    before = evaluate(model, loaders.test)["accuracy"]
    after = fit(model, loaders, args.finetune)
    text += table("TT-SVD of the trained dense hidden layer, rank 16 (t3f tutorial: 64.43% -> 97.65% on MNIST)",
                  ["layer params", "weight rel. error", "acc before fine-tune", f"after {args.finetune} epoch(s)"],
                  [[f"{n_params(tt):,d}", f"{tt.approx_error:.3f}", f"{before:.4f}", f"{after:.4f}"]])
    plot(curves, OUT / "fc_accuracy_vs_params.png", "hidden-layer parameters",
         "FC 784-625-10 on Fashion-MNIST: TT vs matrix rank vs dense")
    return text


def plot(curves: dict, path: Path, xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, pts), marker in zip(curves.items(), "os^"):
        pts = sorted(pts)
        ax.plot([p for p, _ in pts], [100 * a for _, a in pts], marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 2. compress a trained FC head, fine-tune ---------------------------------------------------
def part_head(loaders, args) -> str:
    torch.manual_seed(0)
    dense = ConvNet()
    base = fit(dense, loaders, args.epochs)
    x = torch.randn(2, 1, 28, 28)
    rows = [["dense", f"{dense.fc1.weight.numel():,d}", "1x", "-", f"{base:.4f}", f"{base:.4f}"]]
    for r in args.head_ranks:
        plan = ts.make_plan(dense, "tt", x, ranks=r, include=["fc1"], objective="params")
        model = ts.compress(copy.deepcopy(dense), plan, progress=False)
        before = evaluate(model, loaders.test)["accuracy"]
        after = fit(model, loaders, args.finetune)
        lp = n_params(model.fc1) - 1024
        rows.append([f"TT{r}", f"{lp:,d}", f"{dense.fc1.weight.numel() / lp:.0f}x",
                     f"{model.fc1.approx_error:.3f}", f"{before:.4f}", f"{after:.4f}"])
    return table(f"FC head 1568->1024 of a trained conv net ({args.epochs} epochs dense), TT-SVD then "
                 f"{args.finetune} epoch(s) fine-tune",
                 ["fc1", "fc1 weights", "fc1 compression", "weight rel. error", "acc after TT-SVD",
                  "acc after fine-tune"], rows)


# -- 3. ultimate tensorization: conv-TT-fc, TT-conv-TT-fc from scratch -------------------------
def part_ultimate(loaders, args) -> str:
    x = torch.randn(2, 1, 28, 28)
    dense_params = n_params(ConvNet())
    rows = []
    for conv_r, fc_r in [(0, 0), (0, 8), (0, 2), (8, 8), (4, 2)]:
        torch.manual_seed(0)
        model = ConvNet(conv_r, fc_r)
        t0 = time.perf_counter()
        acc = fit(model, loaders, args.epochs)
        name = ("TT-conv-" if conv_r else "conv-") + ("TT-fc" if fc_r else "fc")
        cost = ts.count(model, x)
        rows.append([name, conv_r or "-", fc_r or "-", f"{cost.total_params:,d}",
                     f"{dense_params / cost.total_params:.1f}x", f"{cost.total_macs // 2:,d}",
                     f"{acc:.4f}", f"{time.perf_counter() - t0:.0f}"])
    return table(f"Ultimate tensorization, from scratch ({args.epochs} epochs)",
                 ["net", "conv2 TT-rank", "fc1 TT-rank", "params", "compression", "MACs/sample",
                  "test acc", "s"], rows)


# -- 4. speed -------------------------------------------------------------------------------------
def bench(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_speed(args) -> str:
    torch.manual_seed(0)
    rows = []
    x = torch.randn(32, 64, 32, 32)
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    with torch.no_grad():
        t_dense = bench(lambda: conv(x), args.repeats)
        for r in (4, 8, 16):
            tt = TTConv2d.from_conv(conv, r, in_modes=(8, 8), out_modes=(8, 8)).eval()
            t_tt = bench(lambda: tt(x), args.repeats)
            pred = conv.weight.numel() * 32 * 32 / tt.macs(x.shape[1:])
            rows.append([f"TTConv2d 64->64 3x3 r={r}", f"{pred:.2f}x", f"{t_dense / t_tt:.2f}x",
                         f"{t_dense / t_tt / pred:.2f}"])
    text = table("TTConv2d vs nn.Conv2d, batch 32, 32x32, 1 thread (speed / MAC-pred: 1.0 = as its MACs predict)",
                 ["layer", "MAC-predicted speed-up", "measured", "speed / MAC-pred"], rows)
    rows = []
    for name, layer, inp in [
        ("TTLinear 1024x1024 (4,16,16) r=8", TTLinear(1024, 1024, (4, 16, 16), (4, 16, 16), 8), torch.randn(256, 1024)),
        ("TTLinear 784->625 r=16", TTLinear(784, 625, IN_MODES, OUT_MODES, 16), torch.randn(256, 784)),
        ("TTConv2d 64->64 3x3 r=8", TTConv2d(64, 64, 3, 8, padding=1, in_modes=(8, 8), out_modes=(8, 8)),
         torch.randn(32, 64, 32, 32)),
    ]:
        with torch.no_grad():
            t_fwd = bench(lambda: layer(inp), args.repeats)

        def step() -> None:
            layer.zero_grad(set_to_none=True)
            layer(inp).square().mean().backward()

        t_step = bench(step, args.repeats)
        rows.append([name, f"{1e3 * t_fwd:.2f}", f"{1e3 * t_step:.2f}", f"{t_step / t_fwd:.2f}"])
    return text + table("Training step (forward + backward) vs forward, 1 thread",
                        ["layer", "forward ms", "train step ms", "ratio"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["fc", "head", "ultimate", "speed"])
    p.add_argument("--subset", type=int, default=20000, help="training images (0 = all 55,000)")
    p.add_argument("--epochs", type=int, default=2, help="epochs from scratch / of the dense net")
    p.add_argument("--finetune", type=int, default=1, help="fine-tune epochs after TT-SVD")
    p.add_argument("--head-ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--test-images", type=int, default=0, help="evaluate on this many test images (0 = all 10,000)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = []
    if set(args.parts) - {"speed"}:
        full = ts.data.make_loaders(64, val_size=5000, augment=False, subset=args.subset or None)
        test = full.test  # evaluation batches of 256: the first test_images of the official test set
        if args.test_images:
            test = list(itertools.islice(iter(full.test), -(-args.test_images // 256)))
        loaders = types.SimpleNamespace(train=full.train, test=test)
        for name, fn in (("fc", part_fc), ("head", part_head), ("ultimate", part_ultimate)):
            if name in args.parts:
                out.append(fn(loaders, args))
    if "speed" in args.parts:
        out.append(part_speed(args))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"tables_{'_'.join(args.parts)}.md").write_text("\n".join(out) + "\n")
    (OUT / f"settings_{'_'.join(args.parts)}.json").write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()

"""tensorslim decompositions vs tensorly on conv kernels.

    python benchmarks/bench_decompose.py [--parts kernels,tucker-resnet18] [--repeats N] [--quick]

Part ``kernels``: kernels (T, S, 3, 3) with T = S in {256, 512} (``--quick``: 256 only),
float32, two kinds: ``gauss`` (i.i.d. Gaussian: no structure) and ``cp64+10%`` (an exact CP
rank-64 kernel plus Gaussian noise of 10% of its norm). Methods, each with its library's default
settings:

* CP rank 64: ``tensorslim.tensor.cp_als(w, 64)`` vs ``tensorly.decomposition.parafac(w, 64)``
* Tucker-2 ranks (64, 64) on modes (0, 1): ``tensorslim.tensor.tucker(w, (64, 64), modes=(0, 1))``
  vs ``tensorly.decomposition.partial_tucker(w, [64, 64], modes=[0, 1])``

Part ``tucker-resnet18``: the 16 3x3 convs of the BasicBlocks of the registry's ResNet-18
(``tensorslim.models.create("resnet18")``, random init seeded by ``--seed``; the stem conv has
one input channel and is left out), Tucker-2 at ranks round(0.6 x channels):
``TuckerConv2d.from_conv(conv, (r_in, r_out))`` (what ``compress`` runs) vs tensorly's
``partial_tucker(w, [r_out, r_in], modes=[0, 1])`` on the float32 kernel, interleaved layer by
layer. Prints each layer's time and relative weight error, the totals and the mean error.

torch runs with 2 threads (``torch.set_num_threads(2)``); tensorly uses its default numpy
backend with OpenBLAS limited to 2 threads as well. Times are wall-clock medians: tensorly over
``--repeats`` runs (default 1, it is slow), tensorslim over max(3, repeats) runs in ``kernels``
and ``--repeats`` runs in ``tucker-resnet18``. Relative errors ||W - W^|| / ||W|| are computed
the same way (float64) for both.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")  # before numpy is imported anywhere

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tensorslim.tensor import CPTensor, cp_als, tucker  # noqa: E402


def make_kernel(size: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A float32 (size, size, 3, 3) kernel: ``gauss`` or ``cp64+10%``."""
    g = torch.Generator().manual_seed(seed)
    shape = (size, size, 3, 3)
    if kind == "gauss":
        return torch.randn(shape, generator=g)
    factors = tuple(torch.randn(s, 64, generator=g) for s in shape)
    w = CPTensor(weights=torch.ones(64), factors=factors).to_tensor()
    noise = torch.randn(shape, generator=g)
    return w + 0.1 * noise * (w.norm() / noise.norm())


def rel_err(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = w.astype(np.float64)
    return float(np.linalg.norm(w64 - approx.astype(np.float64)) / np.linalg.norm(w64))


def ours(method: str, w: torch.Tensor) -> np.ndarray:
    if method == "CP r=64":
        return cp_als(w, 64).to_tensor().numpy()
    return tucker(w, (64, 64), modes=(0, 1)).to_tensor().numpy()


def peer(method: str, w: np.ndarray) -> np.ndarray:
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker

    if method == "CP r=64":
        return tl.cp_to_tensor(parafac(w, 64))
    (core, factors), _ = partial_tucker(w, [64, 64], modes=[0, 1])
    return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def timed(fn, arg, repeats: int) -> tuple[float, np.ndarray]:
    """(median seconds over `repeats` runs, result of the last run)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_kernels(args: argparse.Namespace) -> None:
    """Part ``kernels``: CP and Tucker-2 of synthetic 3x3 kernels, one row per (kernel, method)."""
    sizes = (256,) if args.quick else (256, 512)
    header = (f"{'kernel':<24} {'method':<14} {'ours s':>8} {'tensorly s':>11} {'speed-up':>9} "
              f"{'ours err':>10} {'tensorly err':>13}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        for kind in ("gauss", "cp64+10%"):
            w = make_kernel(size, kind)
            w_np = w.numpy()
            for method in ("CP r=64", "Tucker2 64,64"):
                t_ours, a_ours = timed(lambda x: ours(method, x), w, max(3, args.repeats))
                t_peer, a_peer = timed(lambda x: peer(method, x), w_np, args.repeats)
                name = f"{size}x{size}x3x3 {kind}"
                print(f"{name:<24} {method:<14} {t_ours:>8.2f} {t_peer:>11.2f} "
                      f"{t_peer / t_ours:>8.1f}x {rel_err(w_np, a_ours):>10.5f} "
                      f"{rel_err(w_np, a_peer):>13.5f}", flush=True)


def resnet18_convs(seed: int) -> list[tuple[str, torch.nn.Conv2d]]:
    """The 3x3 convs of the registry's ResNet-18 BasicBlocks (random init seeded by ``seed``)."""
    from tensorslim.models import create

    torch.manual_seed(seed)
    model = create("resnet18")
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1]


def tucker_layer_ours(conv: torch.nn.Conv2d, ranks: tuple[int, int]) -> np.ndarray:
    """The kernel of ``TuckerConv2d.from_conv(conv, (r_in, r_out))``, rebuilt (T, S, 3, 3)."""
    from tensorslim.layers import TuckerConv2d

    layer = TuckerConv2d.from_conv(conv, ranks)
    return torch.cat([t.to_tensor() for t in layer.to_tucker()]).numpy()


def tucker_layer_peer(w: np.ndarray, ranks: tuple[int, int]) -> np.ndarray:
    """tensorly's ``partial_tucker`` (its defaults) of ``w`` at (r_out, r_in), rebuilt."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    (core, factors), _ = partial_tucker(w, [ranks[1], ranks[0]], modes=[0, 1])
    return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def bench_tucker_resnet18(args: argparse.Namespace) -> None:
    """Part ``tucker-resnet18``: Tucker-2 of ResNet-18's 3x3 convs at ranks 0.6 x channels."""
    header = (f"{'layer':<18} {'kernel':<14} {'ranks':>9} {'ours s':>8} {'tensorly s':>11} "
              f"{'speed-up':>9} {'ours err':>9} {'tensorly err':>13}")
    print(header)
    print("-" * len(header))
    total_ours = total_peer = 0.0
    errs_ours, errs_peer = [], []
    for name, conv in resnet18_convs(args.seed):
        w = conv.weight.detach()
        t_out, s_in = w.shape[:2]
        ranks = (max(1, round(args.fraction * s_in)), max(1, round(args.fraction * t_out)))
        t_ours, a_ours = timed(lambda c: tucker_layer_ours(c, ranks), conv, args.repeats)
        t_peer, a_peer = timed(lambda x: tucker_layer_peer(x, ranks), w.numpy(), args.repeats)
        total_ours, total_peer = total_ours + t_ours, total_peer + t_peer
        errs_ours.append(rel_err(w.numpy(), a_ours))
        errs_peer.append(rel_err(w.numpy(), a_peer))
        shape = "x".join(map(str, w.shape))
        print(f"{name:<18} {shape:<14} {f'{ranks[0]},{ranks[1]}':>9} {t_ours:>8.2f} "
              f"{t_peer:>11.2f} {t_peer / t_ours:>8.1f}x {errs_ours[-1]:>9.5f} "
              f"{errs_peer[-1]:>13.5f}", flush=True)
    print("-" * len(header))
    print(f"{'total / mean err':<43} {total_ours:>8.2f} {total_peer:>11.2f} "
          f"{total_peer / total_ours:>8.1f}x {statistics.mean(errs_ours):>9.5f} "
          f"{statistics.mean(errs_peer):>13.5f}")


PARTS = {"kernels": bench_kernels, "tucker-resnet18": bench_tucker_resnet18}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="kernels",
                        help=f"comma-separated parts to run, from {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="tensorly runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="kernels: 256 x 256 x 3 x 3 only")
    parser.add_argument("--seed", type=int, default=0, help="tucker-resnet18: init seed")
    parser.add_argument("--fraction", type=float, default=0.6,
                        help="tucker-resnet18: ranks as a fraction of the channels")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts={args.parts!r}: unknown {unknown}; known: {', '.join(PARTS)}")
    if args.repeats < 1 or not 0 < args.fraction <= 1:
        parser.error(f"--repeats={args.repeats} must be >= 1 and --fraction={args.fraction} "
                     "in (0, 1]")
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")  # tensorly warns about n_eigenvecs > mode size
    import tensorly

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), tensorly "
          f"{tensorly.__version__} (numpy {np.__version__}, OPENBLAS_NUM_THREADS="
          f"{os.environ['OPENBLAS_NUM_THREADS']}), float32, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    for part in parts:
        print(f"\n== {part}")
        PARTS[part](args)


if __name__ == "__main__":
    main()

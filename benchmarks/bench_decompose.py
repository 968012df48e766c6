"""tensorslim decompositions vs tensorly on conv kernels.

    python benchmarks/bench_decompose.py [--repeats N] [--quick]

Kernels (T, S, 3, 3) with T = S in {256, 512} (``--quick``: 256 only), float32, two kinds:
``gauss`` (i.i.d. Gaussian: no structure) and ``cp64+10%`` (an exact CP rank-64 kernel plus
Gaussian noise of 10% of its norm). Methods, each with its library's default settings:

* CP rank 64: ``tensorslim.tensor.cp_als(w, 64)`` vs ``tensorly.decomposition.parafac(w, 64)``
* Tucker-2 ranks (64, 64) on modes (0, 1): ``tensorslim.tensor.tucker(w, (64, 64), modes=(0, 1))``
  vs ``tensorly.decomposition.partial_tucker(w, [64, 64], modes=[0, 1])``

torch runs with 2 threads (``torch.set_num_threads(2)``); tensorly uses its default numpy
backend with OpenBLAS limited to 2 threads as well. Times are wall-clock medians: tensorly over
``--repeats`` runs (default 1, it is slow), tensorslim over max(3, repeats) runs. Relative errors
||W - W^|| / ||W|| are computed the same way (float64) for both.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="tensorly runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="256 x 256 x 3 x 3 kernels only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")  # tensorly warns about n_eigenvecs > mode size
    import tensorly

    sizes = (256,) if args.quick else (256, 512)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), tensorly "
          f"{tensorly.__version__} (numpy {np.__version__}, OPENBLAS_NUM_THREADS="
          f"{os.environ['OPENBLAS_NUM_THREADS']}), float32, load average at start "
          f"{os.getloadavg()[0]:.2f}")
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


if __name__ == "__main__":
    main()

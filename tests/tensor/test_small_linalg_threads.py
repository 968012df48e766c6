"""The shared guard that runs small decompositions on one intra-op thread (issue 14, "Load
under contention"): set for the duration, restored afterwards (also on an exception), used by
every decomposition that makes many small LAPACK calls. Timing lives in
benchmarks/bench_contention.py, not here."""
from __future__ import annotations

import pytest
import torch

from tensorslim.rank.vbmf import evbmf
from tensorslim.tensor import cp_als, cp_epc, svd, tt_matrix, tt_svd, tucker
from tensorslim.tensor._common import (SMALL_LINALG_THREADS_ENV, SMALL_LINALG_WORK,
                                       small_linalg_threads)

from _tensor_helpers import gen

LAPACK = ("svd", "svdvals", "eigh", "qr", "cholesky_ex", "pinv")

CALLS = {
    "svd": lambda: svd(torch.randn(20, 30, generator=gen(0), dtype=torch.float64), 4),
    "tucker": lambda: tucker(torch.randn(8, 6, 3, 3, generator=gen(0), dtype=torch.float64), 3),
    "tucker2": lambda: tucker(torch.randn(8, 6, 3, 3, generator=gen(0), dtype=torch.float64),
                              (3, 2), modes=(0, 1)),
    "cp_als": lambda: cp_als(torch.randn(8, 6, 3, 3, generator=gen(0), dtype=torch.float64), 4),
    "cp_epc": lambda: cp_epc(torch.randn(8, 6, 3, generator=gen(0), dtype=torch.float64), 3,
                             n_iter=5),
    "tt_svd": lambda: tt_svd(torch.randn(8, 6, 3, 3, generator=gen(0), dtype=torch.float64), 3),
    "tt_matrix": lambda: tt_matrix(torch.randn(12, 20, generator=gen(0), dtype=torch.float64),
                                   (4, 5), (3, 4), 3),
    "evbmf": lambda: evbmf(torch.randn(20, 30, generator=gen(0), dtype=torch.float64)),
}


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv(SMALL_LINALG_THREADS_ENV, raising=False)
    torch.set_num_threads(2)  # the autouse fixture of conftest.py restores the setting
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("name", sorted(CALLS))
def test_small_decompositions_run_lapack_on_one_thread(name, two_threads, monkeypatch):
    seen = []
    for op in LAPACK:
        real = getattr(torch.linalg, op)

        def spy(*args, _real=real, **kwargs):
            seen.append(torch.get_num_threads())
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, op, spy)
    CALLS[name]()
    assert seen and set(seen) == {1}, f"{name}: LAPACK ran with {sorted(set(seen))} threads"
    assert torch.get_num_threads() == 2  # restored


def test_guard_sets_and_restores(two_threads):
    with small_linalg_threads(1000):
        assert torch.get_num_threads() == 1
        with small_linalg_threads(10):  # nested: stays at one, does not restore early
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_guard_restores_on_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with small_linalg_threads(1000):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_guard_leaves_large_and_non_cpu_work_alone(two_threads):
    with small_linalg_threads(SMALL_LINALG_WORK):
        assert torch.get_num_threads() == 2
    with small_linalg_threads(10, torch.device("meta")):
        assert torch.get_num_threads() == 2


def test_guard_env_var_sets_the_count_or_disables_it(two_threads, monkeypatch):
    monkeypatch.setenv(SMALL_LINALG_THREADS_ENV, "0")
    with small_linalg_threads(10):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv(SMALL_LINALG_THREADS_ENV, "3")  # never raises the caller's count
    with small_linalg_threads(10):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv(SMALL_LINALG_THREADS_ENV, "x")
    with pytest.raises(ValueError, match=f"{SMALL_LINALG_THREADS_ENV}='x' must be an int >= 0"):
        with small_linalg_threads(10):
            pass
    assert torch.get_num_threads() == 2

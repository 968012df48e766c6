"""HOOI through Gram eigendecompositions: the same iterates as the textbook SVD-based HOOI, the
complement form of the Tucker-2 Grams, the stopping rule, and decompositions in float32."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import gen, known_tucker, noisy
from torch import nn

from tensorslim.tensor import rel_error, tucker
from tensorslim.tensor.ops import mode_dot, multi_mode_dot, unfold


def _reference_hooi(x, ranks, modes, sweeps):
    """Textbook HOOI (De Lathauwer et al. 2000): HOSVD by SVDs of the unfoldings, then each
    factor <- the leading left singular vectors of the unfolding of X projected on the others.
    Returns the relative error after the HOSVD and after every sweep, and the factors."""
    factors = [torch.linalg.svd(unfold(x, m), full_matrices=False)[0][:, :r]
               for m, r in zip(modes, ranks)]

    def error():
        core = multi_mode_dot(x, factors, modes, transpose=True)
        return rel_error(x, multi_mode_dot(core, factors, modes))

    errors = [error()]
    for _ in range(sweeps):
        for i, (m, r) in enumerate(zip(modes, ranks)):
            y = x
            for j, (mj, u) in enumerate(zip(modes, factors)):
                if j != i:
                    y = mode_dot(y, u.T, mj)
            factors[i] = torch.linalg.svd(unfold(y, m), full_matrices=False)[0][:, :r]
        errors.append(error())
    return errors, factors


@pytest.mark.parametrize("shape,ranks,modes", [
    ((20, 16, 3, 3), (12, 10), (0, 1)),  # ranks above half the channels: complement Grams
    ((20, 16, 3, 3), (6, 5), (0, 1)),  # ranks below half: projected Grams
    ((9, 10, 11), (4, 7, 3), (0, 1, 2)),  # three modes: projections chained
    ((5, 18, 3, 4), (9,), (1,)),  # one mode: the Gram of X itself
])
def test_hooi_iterates_equal_the_svd_based_hooi(shape, ranks, modes):
    x = torch.randn(shape, generator=gen(3), dtype=torch.float64)
    ours = tucker(x, ranks, modes=modes, n_iter=4, tol=0.0)
    ref_errors, ref_factors = _reference_hooi(x, ranks, modes, len(ours.errors) - 1)
    assert len(ours.errors) == (2 if len(modes) == 1 else 5)  # one mode: converged at once
    assert ours.errors == pytest.approx(ref_errors, rel=1e-10)
    for u, v in zip(ours.factors, ref_factors):  # the same subspaces (signs may differ)
        torch.testing.assert_close(u @ u.T, v @ v.T, rtol=0, atol=1e-9)
    assert ours.errors[-1] == pytest.approx(rel_error(x, ours.to_tensor()), rel=1e-12)


def test_complement_grams_recover_a_known_tucker2_from_a_random_start():
    # ranks (12, 9) of (16, 12): every Gram after the start is taken in its complement form
    x = known_tucker((16, 12, 3, 3), (12, 9), modes=(0, 1), seed=4)
    tk = tucker(x, (12, 9), modes=(0, 1), init="random", seed=2, n_iter=10, tol=0.0)
    assert tk.errors[0] > 0.1  # the random start is far off
    assert rel_error(x, tk.to_tensor()) < 1e-10 and tk.errors[-1] < 1e-10
    for f in tk.factors:
        torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_default_tol_stops_once_a_sweep_gains_under_0_01_percent():
    x = torch.randn(40, 32, 3, 3, generator=gen(5), dtype=torch.float64)
    fast = tucker(x, (24, 19), modes=(0, 1))
    slow = tucker(x, (24, 19), modes=(0, 1), n_iter=300, tol=1e-12)
    gains = [(a - b) / a for a, b in zip(fast.errors, fast.errors[1:])]
    assert all(g > 1e-4 for g in gains[:-1]) and gains[-1] <= 1e-4
    assert 3 <= len(fast.errors) - 1 <= 15 < len(slow.errors) - 1
    # what the further sweeps buy is small next to the HOSVD -> HOOI gain
    assert fast.errors[-1] - slow.errors[-1] < 0.1 * (fast.errors[0] - fast.errors[-1])
    assert slow.errors[-1] <= fast.errors[-1] <= fast.errors[0]


def test_float32_runs_in_float32_with_the_float64_error():
    x64 = noisy(known_tucker((48, 40, 3, 3), (20, 16), modes=(0, 1), seed=6), 0.3)
    x32 = x64.float()
    a = tucker(x32, (26, 22), modes=(0, 1))
    b = tucker(x32.double(), (26, 22), modes=(0, 1))
    assert a.core.dtype == torch.float32 and all(f.dtype == torch.float32 for f in a.factors)
    assert len(a.errors) == len(b.errors)
    assert a.errors[-1] == pytest.approx(b.errors[-1], rel=1e-5)
    assert a.errors[-1] == pytest.approx(rel_error(x32, a.to_tensor()), rel=1e-5)


def test_tucker_conv_from_a_float32_conv_decomposes_in_float32():
    from tensorslim.layers import TuckerConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 32, 3, padding=1)
    layer = TuckerConv2d.from_conv(conv, (14, 19))
    w = conv.weight.detach().double()
    kernel = torch.cat([t.to_tensor() for t in layer.to_tucker()])
    assert layer.project_in.weight.dtype == torch.float32
    assert layer.approx_error == pytest.approx(rel_error(w, kernel), rel=1e-5)
    ref = tucker(w, (19, 14), modes=(0, 1))  # the same decomposition in float64
    assert layer.approx_error == pytest.approx(ref.errors[-1], rel=1e-5)
    x = torch.randn(2, 24, 7, 6, generator=gen(1))
    dense = nn.functional.conv2d(x.double(), kernel, conv.bias.double(), padding=1)
    torch.testing.assert_close(layer(x).double(), dense, rtol=1e-4, atol=1e-5)

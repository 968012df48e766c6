import json
import math

import numpy as np
import pytest
import torch

from tensorslim.layers import LowRankConv2d, LowRankLinear, TuckerConv2d
from tensorslim.planning import vbmf_ranks_factorized
from tensorslim.rank import VBMFResult, evbmf, evbmf_rank, soften_rank, vbmf_ranks
from tensorslim.tensor import mode_dot


def _planted(L, M, r, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, r, generator=g, dtype=torch.float64)
    b = torch.randn(r, M, generator=g, dtype=torch.float64)
    return a @ b + sigma * torch.randn(L, M, generator=g, dtype=torch.float64)


def _planted_conv(T, S, r_in, r_out, sigma, seed=0):
    """Kernel (T, S, 3, 3) of exact Tucker ranks (r_in, r_out) plus N(0, sigma^2) noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(T, r_out, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(S, r_in, generator=g, dtype=torch.float64))[0]
    w = mode_dot(mode_dot(core, u_out, 0), u_in, 1)
    return w + sigma * torch.randn(w.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("L,M,r,sigma", [
    (64, 48, 5, 0.1), (48, 64, 5, 0.1), (200, 100, 12, 0.5), (100, 100, 8, 1.0), (30, 300, 4, 0.2),
])
def test_recovers_planted_rank_and_noise_variance(L, M, r, sigma):
    res = evbmf(_planted(L, M, r, sigma))
    assert res.rank == r
    assert abs(res.sigma2 / sigma ** 2 - 1) < 0.1  # measured: within 4 %
    assert len(res.singular_values) == r


def test_pure_noise_has_rank_zero():
    g = torch.Generator().manual_seed(3)
    for L, M in [(64, 48), (200, 100), (20, 500)]:
        res = evbmf(torch.randn(L, M, generator=g, dtype=torch.float64) * 0.3)
        assert res.rank == 0 and res.singular_values == ()
        assert abs(res.sigma2 / 0.09 - 1) < 0.1


def test_known_sigma2_threshold_and_shrinkage():
    y = _planted(64, 48, 5, 0.1)
    res = evbmf(y, sigma2=0.01)
    L, M = 48, 64  # transposed so L <= M
    tau = 2.5129 * math.sqrt(L / M)
    assert res.threshold == pytest.approx(math.sqrt(M * 0.01 * (1 + tau) * (1 + L / M / tau)), rel=1e-12)
    s = torch.linalg.svdvals(y)
    assert res.rank == int((s > res.threshold).sum()) == 5
    d = torch.tensor(res.singular_values)
    assert torch.all(d < s[:5]) and torch.all(d > 0.95 * s[:5])  # shrunk, but only a little
    assert evbmf(y, sigma2=1e6).rank == 0  # huge noise: nothing survives


def test_orientation_invariant_and_json_round_trip():
    y = _planted(40, 90, 6, 0.2)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == 6 and a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)
    back = VBMFResult.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back == a
    assert evbmf_rank(y) == 6
    assert evbmf(torch.zeros(5, 7)).rank == 0


def _reference_sigma2(y: np.ndarray) -> float:
    """Independent EVBMF noise estimate with scipy's bounded Brent search (reference port)."""
    from scipy.optimize import minimize_scalar

    L, M = sorted(y.shape)
    s = np.linalg.svd(y, compute_uv=False)
    a = L / M
    t_bar = 2.5129 * np.sqrt(a)
    x_bar = (1 + t_bar) * (1 + a / t_bar)

    def f(s2):
        x = s ** 2 / (M * s2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        t = 0.5 * (z1 - 1 - a + np.sqrt((z1 - 1 - a) ** 2 - 4 * a))
        return (np.sum(z2 - np.log(z2)) + np.sum(z1 - t) + np.sum(np.log((t + 1) / z1))
                + a * np.sum(np.log(t / a + 1)))

    e = int(min(np.ceil(L / (1 + a)) - 1, L)) - 1
    lo = max(s[e + 1] ** 2 / (M * x_bar), np.mean(s[e + 1:] ** 2) / M)
    return float(minimize_scalar(f, bounds=[lo, np.sum(s ** 2) / (L * M)], method="bounded").x)


@pytest.mark.parametrize("L,M,r,sigma", [(64, 48, 5, 0.1), (64, 576, 20, 0.05), (10, 90, 3, 0.3)])
def test_noise_estimate_matches_reference_implementation(L, M, r, sigma):
    pytest.importorskip("scipy")
    y = _planted(L, M, r, sigma, seed=1)
    assert evbmf(y).sigma2 == pytest.approx(_reference_sigma2(y.numpy()), rel=2e-3)


def test_musco_softening_arithmetic():
    assert soften_rank(64, 10, 1.0) == 10  # pure VBMF
    assert soften_rank(64, 10, 0.0) == 64  # no compression
    assert soften_rank(64, 10, 0.5) == 37  # 64 - 0.5 * 54
    assert soften_rank(10, 4, 0.3) == 8  # floor(10 - 1.8)
    assert soften_rank(10, 4, 0.5) == 7  # exact, no float floor-off
    assert soften_rank(5, 0, 1.0) == 1  # clipped to >= 1
    assert soften_rank(64, 10, 1.0, min_rank=21) == 21 and soften_rank(16, 10, 1.0, min_rank=21) == 16
    for bad in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            soften_rank(10, 4, bad)


def test_vbmf_ranks_of_a_planted_tucker_kernel():
    w = _planted_conv(64, 48, 6, 10, 0.05)
    assert vbmf_ranks(w, "tucker") == (6, 10)
    assert vbmf_ranks(w, "tucker", factor=0.5) == (27, 37)  # 48 - 21, 64 - 27
    assert vbmf_ranks(w, "tucker", factor=0.0) == (48, 64)
    assert vbmf_ranks(w, "svd") == 10  # (T, S*9) unfolding has the output rank
    assert vbmf_ranks(_planted(60, 80, 7, 0.05), "svd") == 7
    with pytest.raises(ValueError, match="'tucker' and 'svd'.*'cp'"):
        vbmf_ranks(w, "cp")
    with pytest.raises(ValueError, match="conv kernel"):
        vbmf_ranks(torch.randn(4, 5), "tucker")
    with pytest.raises(TypeError):
        vbmf_ranks(np.zeros((4, 5)), "svd")


def test_vbmf_ranks_of_factorized_layers_ignore_factor_scaling():
    conv = torch.nn.Conv2d(48, 64, 3).double()
    conv.weight.data = _planted_conv(64, 48, 6, 10, 0.05)
    tk = TuckerConv2d.from_dense(conv, (16, 24))
    assert vbmf_ranks_factorized(tk) == (6, 10)
    assert vbmf_ranks_factorized(tk, 0.5) == (11, 17)  # 16 - 5, 24 - 7
    with torch.no_grad():  # what fine-tuning may do: move scale between core and factors
        tk.project_in.weight.mul_(10)
        tk.core.weight.div_(10)
        tk.project_out.weight.mul_(3)
    assert vbmf_ranks_factorized(tk) == (6, 10)

    lin = torch.nn.Linear(80, 60).double()
    lin.weight.data = _planted(60, 80, 5, 0.05) / 5
    lr = LowRankLinear.from_dense(lin, 20)
    with torch.no_grad():
        lr.project_in.weight.mul_(7)
        lr.project_out.weight.div_(7)
    assert vbmf_ranks_factorized(lr) == 5
    assert vbmf_ranks_factorized(lr, 0.25) == 16  # floor(20 - 3.75)

    conv2 = torch.nn.Conv2d(48, 64, 3).double()
    conv2.weight.data = _planted_conv(64, 48, 6, 10, 0.05)
    for r in (12, 16, 30):  # also when the current rank is tight
        assert vbmf_ranks_factorized(LowRankConv2d.from_dense(conv2, r)) == 10
        assert vbmf_ranks_factorized(LowRankConv2d.from_dense(conv2, r), min_rank=11) == 11
    assert vbmf_ranks_factorized(TuckerConv2d.from_dense(conv2, (8, 12))) == (6, 10)
    with pytest.raises(ValueError, match="supports TuckerConv1d/2d"):
        vbmf_ranks_factorized(torch.nn.Linear(3, 4))


def test_bad_inputs():
    with pytest.raises(TypeError, match="torch.Tensor"):
        evbmf([[1.0, 2.0]])
    with pytest.raises(ValueError, match="2-D"):
        evbmf(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="sigma2"):
        evbmf(torch.eye(3), sigma2=-1.0)

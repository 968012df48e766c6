"""Batched filter-wise CP, coupled CP, principal angles and NORTON's filter distance."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from tensorslim import tensor as T
from tensorslim.tensor.filter_cp import coupled_filter_cp, filter_cp, filter_distances


def _known(n, dims, r, seed=0, shared=None):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(n, d, r, generator=g, dtype=torch.float64) for d in dims]
    if shared is not None:
        fs[0] = fs[0][shared]
    return torch.einsum("nir,njr,nkr->nijk", *fs)


@pytest.mark.parametrize("p,q", [(3, 2), (2, 3), (4, 4), (1, 5)])
def test_principal_angles_equal_scipy(p, q):
    g = torch.Generator().manual_seed(p * 10 + q)
    a = torch.randn(9, p, generator=g, dtype=torch.float64)
    b = torch.randn(9, q, generator=g, dtype=torch.float64)
    got = T.principal_angles(a, b)
    ref = scipy.linalg.subspace_angles(a.numpy(), b.numpy())
    assert got.shape == (min(p, q),)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)


def test_principal_angles_batched_and_tiny_angles():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 8, 2, generator=g, dtype=torch.float64)
    b = a + 1e-9 * torch.randn(5, 8, 2, generator=g, dtype=torch.float64)
    got = T.principal_angles(a, b)
    for i in range(5):
        ref = scipy.linalg.subspace_angles(a[i].numpy(), b[i].numpy())
        np.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-6, atol=1e-15)
    with pytest.raises(ValueError, match="same number of rows"):
        T.principal_angles(torch.randn(4, 2), torch.randn(5, 2))


def test_filter_cp_recovers_known_rank_filters_float64():
    x = _known(40, (16, 3, 3), 2)
    cp = filter_cp(x, 2, n_iter=300)
    assert cp.factors[0].shape == (40, 16, 2) and cp.weights.shape == (40, 2)
    assert float(cp.errors.median()) < 1e-9
    assert int((cp.errors < 1e-6).sum()) >= 38  # ALS may sit in a swamp on one or two
    rel = (cp.to_tensor() - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    torch.testing.assert_close(rel, cp.errors, rtol=0, atol=1e-12)


def test_filter_cp_full_rank_is_exact_and_deterministic():
    x = torch.randn(7, 5, 3, 2, dtype=torch.float64)
    full = min(6, 10, 15)
    cp = filter_cp(x, full)
    assert float((cp.to_tensor() - x).abs().max()) < 1e-12
    a, b = filter_cp(x, 2, seed=4), filter_cp(x, 2, seed=4)
    for fa, fb in zip(a.factors, b.factors):
        assert torch.equal(fa, fb)
    with pytest.raises(ValueError, match="exceeds the generic CP rank"):
        filter_cp(x, full + 1)
    assert filter_cp(x.float(), 2).weights.dtype == torch.float32


def test_duplicate_filters_have_zero_distance_and_matrix_is_a_metric_shape():
    x = torch.randn(12, 6, 3, 3, dtype=torch.float64)
    x[7] = x[2]
    cp = filter_cp(x, 2, n_iter=100)
    d = filter_distances(cp)
    assert d.shape == (12, 12) and torch.equal(d, d.T) and float(d.diagonal().abs().max()) == 0
    assert float(d[2, 7]) < 1e-6
    off = d + torch.eye(12, dtype=d.dtype) * 10
    assert divmod(int(torch.argmin(off)), 12) in ((2, 7), (7, 2))
    assert float(d.max()) <= math.pi / 2 + 1e-12
    # D is the weighted sum of the per-factor largest principal angles
    i, j = 0, 5
    per = [float(T.principal_angles(f[i], f[j]).max()) for f in cp.factors]
    assert abs(float(d[i, j]) - sum(per) / 3) < 1e-10


def test_coupled_cp_shares_the_channel_factor_and_recovers_coupled_filters():
    clusters = torch.arange(24) % 4
    x = _known(24, (10, 3, 3), 2, shared=clusters)
    cp = coupled_filter_cp(x, 2, clusters, n_iter=1000)
    assert float(cp.errors.max()) < 1e-6
    a = cp.factors[0]
    for k in range(4):
        members = (clusters == k).nonzero().flatten()
        assert float((a[members] - a[members[0]]).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="every value"):
        coupled_filter_cp(x, 2, torch.where(clusters == 1, 5, clusters))

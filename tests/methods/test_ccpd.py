"""CCPD (CONCATENATION): clustering, coupled plans counted exactly, MAC targets."""
import pytest
import torch

import tensorslim as ts
from tensorslim.methods.ccpd import ccpd, cut, merge_sequence


def test_average_linkage_merges_the_closest_first_and_cuts_into_k():
    d = torch.tensor([[0, 1, 8, 9], [1, 0, 7, 9], [8, 7, 0, 2], [9, 9, 2, 0]], dtype=torch.float64)
    merges = merge_sequence(d)
    assert merges[0] == (0, 1) and merges[1] == (2, 3)
    assert cut(merges, 4, 2) == (0, 0, 1, 1)
    assert cut(merges, 4, 4) == (0, 1, 2, 3) and cut(merges, 4, 1) == (0, 0, 0, 0)


def test_ccpd_plan_counts_and_cluster_fraction():
    torch.manual_seed(0)
    model = ts.models.create("vgg16", width=0.25).eval()
    x = torch.randn(1, 1, 28, 28)
    res = ccpd(model, x, rank=2, clusters=0.25, n_iter=20, progress=False)
    rep = ts.count(res.model, x)
    assert (res.plan.params_after, res.plan.macs_after) == (rep.total_params, rep.total_macs)
    for s in res.plan.compressed:
        k = max(s.options["clusters"]) + 1
        assert k == -(-len(s.options["clusters"]) // 4)
    assert res.plan.macs_after < res.plan.macs_before
    tgt = ccpd(model, x, rank=2, target_macs=0.15, n_iter=20, progress=False)
    assert tgt.plan.macs_after <= 0.15 * tgt.plan.macs_before
    with pytest.raises(ValueError, match="not both"):
        ccpd(model, x, clusters=0.5, target_macs=0.2, progress=False)

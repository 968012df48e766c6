"""ASNet and the active-subspace analysis: the Frequent-Directions sketch against the exact
gradient covariance (float64), the PCE head, the plan/replay, the universal attack."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis import (FrequentDirections, active_subspace, cut_gradients,
                                 universal_attack)
from tensorslim.methods.asnet import PCE, asnet, fit_pce, pce_terms
from tensorslim.plan import CompressionPlan
from tensorslim.surgery import apply_edits

from _threads import one_thread  # noqa: F401 - every test here on one thread


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    m = ts.models.create("vgg16", width=0.125).double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 0.3)
    return m


def _batches(n: int = 6, b: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(b, 1, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def _max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a)[0], torch.linalg.qr(b)[0]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.arccos(cos).max())


@pytest.mark.parametrize("cut,ell", [("features.34", 64), ("features.24", 128)])
def test_sketched_active_subspace_matches_exact_eigenvectors(cut, ell):
    m, data = _vgg(), _batches()
    grads = torch.cat([cut_gradients(m.requires_grad_(False), cut, x, y)[2] for x, y in data])
    m.requires_grad_(True)
    evals, evecs = torch.linalg.eigh(grads.T @ grads / grads.shape[0])
    evals, evecs = evals.flip(0), evecs.flip(1)
    rank = 5
    assert float(evals[rank - 1] - evals[rank]) > 1e-3 * float(evals[0])  # a clear gap
    # ell >= D: the sketch (shrunk once the buffer passes 2 * ell rows) loses nothing but
    # rounding, so its leading right singular vectors are the covariance's eigenvectors
    sub = active_subspace(m, cut, data, rank=rank, sketch_size=ell)
    assert sub.samples == 300 and sub.basis.shape == (grads.shape[1], rank)
    assert _max_angle(sub.basis, evecs[:, :rank]) < 1e-6
    torch.testing.assert_close(sub.eigenvalues, evals[:rank], rtol=1e-8, atol=0)


def test_frequent_directions_error_bound():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(500, 30, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 30, dtype=torch.float64))
    fd = FrequentDirections(10)
    for i in range(0, 500, 37):
        fd.update(G[i:i + 37])
    B = fd.sketch()
    err = torch.linalg.matrix_norm(G.T @ G - B.T @ B, ord=2)
    k = 5
    tail = (torch.linalg.svdvals(G)[k:] ** 2).sum()
    assert float(err) <= float(tail) / (10 - k) * (1 + 1e-9)


def test_pce_basis_and_degree_one_equals_a_linear_head():
    x = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    basis = PCE(2, 2)(x)  # 1, x1, x2, He2(x1), x1 x2, He2(x2)
    torch.testing.assert_close(basis, torch.tensor([[1.0, 0.5, -2.0, -0.75, -1.0, 3.0]],
                                                   dtype=torch.float64))
    assert len(pce_terms(7, 3)) == math.comb(10, 3) == PCE(7, 3).terms
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = torch.randn(200, 3, generator=g, dtype=torch.float64)
    coef = fit_pce(f, y, 1, ridge=0.0)
    a = torch.cat([torch.ones(200, 1, dtype=torch.float64), f], 1)
    linear = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(coef, linear, rtol=1e-10, atol=1e-10)
    head = nn.Linear(4, 3).double()
    with torch.no_grad():
        head.weight.copy_(linear[1:].T)
        head.bias.copy_(linear[0])
    torch.testing.assert_close(PCE(4, 1)(f) @ coef, head(f), rtol=1e-10, atol=1e-10)


def test_asnet_plan_counts_and_replays():
    m, data = _vgg(), _batches()
    x = data[0][0][:2]
    res = asnet(m, x, train_loader=data, cut="features.24", rank=6, degree=2, progress=False)
    counted = ts.count(res.model, x[:1])
    plan = res.plan
    assert (plan.macs_after, plan.params_after) == (counted.total_macs, counted.total_params)
    dim = 32 * 2 * 2
    head_macs = 6 * dim + math.comb(8, 2) * 10
    dense = ts.count(m, x[:1])
    prefix = sum(l.macs for l in dense.layers if l.name.startswith("features.")
                 and int(l.name.split(".")[1]) < 24)
    assert plan.macs_after == prefix + head_macs
    (edit,) = plan.edits
    assert (edit.op, edit.args["dim"], edit.args["terms"]) == ("asnet_head", dim, 28)
    assert CompressionPlan.from_json(plan.to_json()) == plan
    assert res.history["fit_rel_error"] < 1.0
    fresh = apply_edits(_vgg(), plan.edits, weights=False)
    fresh.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), res.model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="asnet: rank must be"):
        asnet(m, x, train_loader=data, rank=0, progress=False)
    with pytest.raises(ValueError, match="accepted: features.0"):
        asnet(m, x, train_loader=data, cut="features.1", progress=False)


def test_universal_attack_finds_the_only_sensitive_direction():
    # logits depend on the input only through x . w: the loss gradient is always along w
    w = torch.zeros(1, 4, 4, dtype=torch.float64)
    w[0, 1, 2] = 1.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w.flatten(), -w.flatten()]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 4, 4, generator=g, dtype=torch.float64)
    y = (x.flatten(1) @ w.flatten() < 0).long()  # class 0 when x . w > 0
    data = [(x[:100], y[:100]), (x[100:], y[100:])]
    sub = active_subspace(model, "input", data, rank=1)
    assert abs(float(sub.basis[:, 0] @ w.flatten())) == pytest.approx(1.0, abs=1e-12)
    res = universal_attack(model, data, eps=1.0)
    assert res.samples == 200  # every sample is classified correctly
    assert res.active_rate >= 0.4 and res.random_rate < res.active_rate

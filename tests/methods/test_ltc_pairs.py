"""LTC's Tucker-2 candidates (``pairs``) and rank-choice error (``rank_error``): the C-step
on the planner's proportional pairs with the truncated-HOSVD bound, against brute force over
explicit SVDs, and against the one-shot min_error plan it reproduces on the dense weights."""
from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.methods import _ltc_core as core
from tensorslim.methods.ltc import LTCOptions

from test_ltc import X, _layers, _layers_of, _small, _toy  # tests/methods is on the path


def _explicit_projection(w: torch.Tensor, rank) -> torch.Tensor:
    """Pi_rank(w) from SVDs of the unfoldings (Tucker-2: both channel modes; int: matrix)."""
    w = w.double()
    if isinstance(rank, int):
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape)
    a_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :rank[1]]
    a_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0][:, :rank[0]]
    return torch.einsum("ta,ua,usk,sb,vb->tvk", a_out, a_out, w.reshape(*w.shape[:2], -1),
                        a_in, a_in).reshape(w.shape)


# ---- the Tucker-2 candidates: planner pairs and the HOSVD-bound rank error ---------------

def _tails(m: torch.Tensor) -> torch.Tensor:
    """t[r - 1] = energy of the singular values of ``m`` beyond the first r (r = 1..)."""
    s2 = torch.linalg.svdvals(m) ** 2
    return torch.stack([s2[r:].sum() for r in range(1, s2.numel() + 1)])


def test_bound_c_step_on_planner_pairs_equals_brute_force():
    """pairs="proportional", rank_error="bound": per layer the rank minimising
    lam C(r) + mu/2 s (e_in(r_in) + e_out(r_out)) over the planner's pairs (tails from explicit
    SVDs of the unfoldings) and the dense layer; Theta is the explicit projection."""
    from tensorslim.planning.candidates import rank_space

    net, x = _small()
    total = ts.count(net, x).total_params
    layers = [core.price(l, "params", total, "proportional", "bound") for l in _layers_of(net, x)]
    assert [l.bound for l in layers] == [True, True, False]  # the Linear keeps its SVD error
    mu, seen = 0.3, {l.name: set() for l in layers}
    weights = {"0": 0.5, "2": 2.0, "6": 1.0}
    for lam in torch.logspace(-4, 1, 16, dtype=torch.float64).tolist():
        ranks, thetas, _ = core.c_step(layers, net, {}, mu, lam, None, weights)
        for l in layers:
            w = net.get_submodule(l.name).weight.detach()
            s = weights[l.name]
            best = (lam * l.dense_cost, None)  # dense wins ties
            if l.tucker:
                t_in = _tails(w.transpose(0, 1).reshape(w.shape[1], -1))
                t_out = _tails(w.reshape(w.shape[0], -1))
                cands = [(r, t_in[r[0] - 1] + t_out[r[1] - 1]) for r in rank_space(l.planned)]
            else:
                t = _tails(w.reshape(w.shape[0], -1))
                cands = [(r, t[r - 1]) for r in range(1, t.numel() + 1)]
            for r, e in cands:
                c = core.rank_cost(l, r)
                if c >= l.dense_cost:
                    continue
                obj = lam * c + mu / 2 * s * float(e)
                if obj < best[0] - 1e-12:
                    best = (obj, r)
            assert ranks[l.name] == best[1], (lam, l.name)
            seen[l.name].add(best[1])
            want = w if best[1] is None else _explicit_projection(w, best[1])
            torch.testing.assert_close(thetas[l.name], want, rtol=0, atol=1e-10)
    for name, got in seen.items():  # dense, the smallest rank and something between
        assert None in got and len(got) >= 3, (name, got)
    assert all(r is None or r in rank_space(layers[0].planned) for r in seen["0"])
    with pytest.raises(ValueError, match="pairs must be one of all, proportional, got 'even'"):
        LTCOptions(lam=1.0, pairs="even")
    with pytest.raises(ValueError, match="rank_error must be one of exact, bound, got 'hooi'"):
        LTCOptions(lam=1.0, rank_error="hooi")


def test_the_bound_is_the_sum_of_the_two_unfolding_tails_and_above_the_exact_error():
    from tensorslim.rank.lc import tucker2_bound_errors, tucker2_errors, tucker2_spectrum

    w = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    spec = tucker2_spectrum(w)
    bound = tucker2_bound_errors(spec.energy, spec.norm2)
    t_in, t_out = _tails(w.transpose(0, 1).reshape(5, -1)), _tails(w.reshape(7, -1))
    torch.testing.assert_close(bound, t_in[:, None] + t_out[None, :], rtol=0, atol=1e-10)
    exact = tucker2_errors(spec.energy, spec.norm2)
    assert bool((bound >= exact - 1e-10).all()) and float(bound[-1, -1]) == pytest.approx(0, abs=1e-9)


def test_bound_c_step_on_planner_pairs_reproduces_the_min_error_plan():
    """On the dense weights with the relative price, the initial C-step for a MAC target
    chooses the one-shot planner's min_error ranks (same candidates, same error proxy)."""
    from tensorslim.methods._ltc_price import layer_weights

    net = _toy()
    total = ts.count(net, X[:1]).total_macs
    layers = [core.price(l, "macs", total, "proportional", "bound") for l in _layers(net)]
    weights = layer_weights("relative", net, layers, [], 1, 0.5)
    for target in (0.6, 0.4, 0.25):
        plan = ts.make_plan(net, "tucker", X[:1], target_macs=target, rank_rule="min_error")
        want = {s.name: s.rank for s in plan.layers if s.name in {l.name for l in layers}}
        want = {n: (r if r is not None else None) for n, r in want.items()}
        budget = core.budget(target, None, "macs", layers)
        got = core.c_step(layers, net, {}, 0.05, None, budget, weights)[0]
        assert got == want, target

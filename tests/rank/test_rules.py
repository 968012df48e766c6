import copy
import itertools
import json

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import models
from tensorslim.plan import CompressionPlan
from tensorslim.rank import (constant_rate_index, error_proxies, min_error_allocation, smallest_passing,
                             tail_energy, vbmf_ranks)
from tensorslim.tensor import svd, tucker, unfold


# --------------------------------------------------------------------------- pure functions
def test_tail_energy_exact():
    t = tail_energy(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    assert torch.allclose(t, torch.tensor([14, 5, 1, 0], dtype=torch.float64) / 14, atol=1e-15)


def test_svd_proxy_is_eckart_young_and_tucker_proxy_bounds_hooi():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64)
    m = w.reshape(24, -1)
    for r, p in zip((2, 8, 16), error_proxies(w, "svd", [2, 8, 16])):
        assert p == pytest.approx(svd(m, r).errors[0] ** 2, rel=1e-9)
    ranks = [(2, 3), (4, 6), (8, 12), (16, 24)]
    proxies = error_proxies(w, "tucker", ranks)
    assert proxies == sorted(proxies, reverse=True) and proxies[-1] == pytest.approx(0, abs=1e-12)
    for (ri, ro), p in zip(ranks, proxies):
        err = float(((tucker(w, (ro, ri), modes=(0, 1)).to_tensor() - w).norm() / w.norm()) ** 2)
        assert err <= p + 1e-12 and err >= 0.5 * p  # HOSVD bound; within 2x of the truth


def test_cp_proxy_between_bounds_and_decreasing():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ranks = list(range(1, 160, 7))
    p = error_proxies(w, "cp", ranks)
    assert all(a >= b for a, b in zip(p, p[1:]))
    assert p[0] > 0.5 and p[-1] < p[3]  # keeps decreasing past the largest mode (16)
    lower = tail_energy(unfold(w, 0))[1].item()  # rank 1 can't beat the mode-0 SVD
    assert p[0] >= lower / 2


def test_filtercp_proxy_is_the_energy_weighted_cp_proxy_of_each_filter():
    """NORTON decomposes every filter on its own: the layer's proxy is each filter's cp proxy
    weighted by its share of the energy; a filter that is exactly rank one in every
    unfolding costs nothing once R reaches the filter's CP-rank bound."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    w[2] = torch.einsum("a,b,c->abc", *(torch.randn(n, generator=g, dtype=torch.float64) for n in (5, 3, 3)))
    ranks = [1, 2, 4, 9, 15]
    got = error_proxies(w, "filtercp", ranks)
    share = (w ** 2).flatten(1).sum(1) / (w ** 2).sum()
    want = [sum(float(share[o]) * error_proxies(w[o], "cp", [r])[0] for o in range(6)) for r in ranks]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(a >= b for a, b in zip(got, got[1:])) and got[-1] == pytest.approx(0, abs=1e-12)  # 15 >= 5*3
    assert error_proxies(w[2:3], "filtercp", [1])[0] < error_proxies(w[:1], "filtercp", [1])[0]
    with pytest.raises(ValueError, match="filtercp decomposes conv filters"):
        error_proxies(torch.randn(4, 3), "filtercp", [1])


def test_make_plan_filtercp_meets_a_mac_target():
    model = models.load_pretrained("vgg16").eval()
    x = torch.randn(1, 1, 28, 28)
    plan = ts.make_plan(model, "filtercp", x, target_macs=0.3)
    comp = ts.compress(copy.deepcopy(model), plan, progress=False)
    ratio = ts.count(comp, x).total_macs / ts.count(model, x).total_macs
    assert 0.28 <= ratio <= 0.3 and {s.method for s in plan.layers if s.rank} == {"filtercp"}


def test_grouped_proxy_sums_groups():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    both = error_proxies(w, "svd", [4], groups=2)[0]
    parts = [error_proxies(b, "svd", [2])[0] * float((b ** 2).sum() / (w ** 2).sum()) for b in w.chunk(2)]
    assert both == pytest.approx(sum(parts), rel=1e-12)


def test_constant_rate_index():
    assert constant_rate_index([10, 20, 30, 40], 100, 4.0) == 1  # 20 <= 25 < 30
    assert constant_rate_index([10, 20, 25, 40], 100, 4.0) == 2  # equality counts
    assert constant_rate_index([30, 40], 100, 4.0) is None
    with pytest.raises(ValueError, match="rate must be"):
        constant_rate_index([1], 10, 0.5)


def test_smallest_passing_bisects():
    calls = []
    assert smallest_passing(100, lambda i: calls.append(i) or i >= 37) == 37
    assert len(calls) <= 8  # log2(100) + 1
    assert smallest_passing(10, lambda i: False) is None
    assert smallest_passing(10, lambda i: True) == 0


def test_min_error_allocation_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    costs, errors = [], []
    for _ in range(4):  # convex decreasing error curves, 6 options per layer
        c = torch.cumsum(torch.rand(6, generator=g) + 0.2, 0)
        e = torch.exp(-torch.cumsum(torch.rand(6, generator=g) + 0.1, 0))
        costs.append(c.tolist())
        errors.append(e.tolist())
    for frac in (0.3, 0.5, 0.8):
        budget = frac * sum(c[-1] for c in costs)
        idx = min_error_allocation(costs, errors, budget)
        assert sum(c[i] for c, i in zip(costs, idx)) <= budget
        best = min(sum(e[i] for e, i in zip(errors, choice))
                   for choice in itertools.product(range(6), repeat=4)
                   if sum(c[i] for c, i in zip(costs, choice)) <= budget)
        assert sum(e[i] for e, i in zip(errors, idx)) <= best * 1.05  # measured: 1.0, 1.0, 1.005 x optimum
    with pytest.raises(ValueError, match="below the cheapest"):
        min_error_allocation(costs, errors, 0.1)


# --------------------------------------------------------------------------- make_plan rules
@pytest.fixture(scope="module")
def vgg():
    """vgg16 width 1/8 whose conv/linear weights get layer-dependent decaying spectra
    (s_i ~ i^-p, p from 0.3 to 2), like trained layers of different redundancy."""
    torch.manual_seed(0)
    m = models.create("vgg16", width=0.125).eval()
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for k, mod in enumerate(layers):
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            p = 0.3 + 1.7 * ((k * 7) % len(layers)) / len(layers)
            s = s[0] * torch.arange(1, s.numel() + 1, dtype=s.dtype) ** -p
            mod.weight.copy_(((u * s) @ vh).reshape(mod.weight.shape))
    return m


@pytest.fixture(scope="module")
def x28():
    return torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _summed_proxy(model, plan):
    return sum(error_proxies(model.get_submodule(s.name).weight, s.method, [s.rank])[0]
               for s in plan.compressed)


@pytest.mark.parametrize("method,target", [("tucker", 0.25), ("svd", 0.4), ("auto", 0.3), ("cp", 0.3)])
def test_min_error_meets_target_with_less_error_than_uniform(vgg, x28, method, target):
    uni = ts.make_plan(vgg, method, x28, target_macs=target, rank_rule="uniform")
    opt = ts.make_plan(vgg, method, x28, target_macs=target, rank_rule="min_error")
    assert target * 0.98 <= opt.macs_ratio <= target
    # the proxy is added over all layers; layers kept dense contribute 0
    e_uni, e_opt = _summed_proxy(vgg, uni), _summed_proxy(vgg, opt)
    assert e_opt < 0.9 * e_uni
    ratios = {round(s.macs_after / s.macs_before, 3) for s in opt.compressed}
    assert len(ratios) >= 3  # different ratios per layer
    assert opt.goal["rank_rule"] == "min_error" and uni.goal["rank_rule"] == "uniform"
    counted = ts.count(ts.compress(copy.deepcopy(vgg), opt, progress=False), x28)
    assert counted.total_macs == opt.macs_after


def test_min_error_layer_weights_and_params_target(vgg, x28):
    base = ts.make_plan(vgg, "tucker", x28, target_params=0.3, rank_rule="min_error")
    assert 0.3 * 0.98 <= base.params_ratio <= 0.3
    name = "features.24"
    heavy = ts.make_plan(vgg, "tucker", x28, target_params=0.3, rank_rule="min_error",
                         layer_weights={name: 50.0})
    assert heavy[name].params_after > base[name].params_after
    assert heavy.goal["layer_weights"] == {name: 50.0}
    with pytest.raises(ValueError, match="not planned for compression: \\['nope'\\]"):
        ts.make_plan(vgg, "tucker", x28, target_params=0.3, rank_rule="min_error", layer_weights={"nope": 1})
    with pytest.raises(ValueError, match="unreachable"):
        ts.make_plan(vgg, "tucker", x28, target_macs=0.001, rank_rule="min_error")


def test_constant_rate_rule(vgg, x28):
    plan = ts.make_plan(vgg, "auto", x28, rank_rule="constant", rate=4.0)
    assert plan.compressed
    for s in plan.compressed:
        assert s.params_after <= s.params_before / 4
        bigger = s.rank + 1 if s.method == "svd" else None
        if bigger is not None and bigger <= min(vgg.get_submodule(s.name).weight.reshape(
                vgg.get_submodule(s.name).weight.shape[0], -1).shape):
            alt = ts.make_plan(vgg, "auto", x28, ranks={s.name: bigger})[s.name]
            assert alt.params_after > s.params_before / 4  # the largest rank that fits
    assert plan.goal == {"rank_rule": "constant", "rate": 4.0, "objective": "macs"}
    assert plan["features.0"].rank == (1, 1)  # 1 -> 8 channels, 72 params: (1, 1) has 18 = 72/4
    first = ts.make_plan(vgg, "auto", x28, rank_rule="constant", rate=5.0)["features.0"]
    assert first.method == "keep" and "no tucker rank has params <= 72/5" in first.reason


def test_energy_rule_is_the_energy_goal(vgg, x28):
    a = ts.make_plan(vgg, "svd", x28, rank_rule="energy", energy=0.8)
    b = ts.make_plan(vgg, "svd", x28, energy=0.8)
    assert [s.rank for s in a.layers] == [s.rank for s in b.layers]
    assert a.goal["rank_rule"] == b.goal["rank_rule"] == "energy"
    for s in a.compressed:
        w = vgg.get_submodule(s.name).weight.detach().double()
        s2 = torch.linalg.svdvals(w.reshape(w.shape[0], -1)) ** 2
        assert s2[: s.rank].sum() / s2.sum() >= 0.8 > s2[: s.rank - 1].sum() / s2.sum()
    default = ts.make_plan(vgg, "svd", x28, rank_rule="energy")
    assert default.goal["energy"] == 0.9


def test_vbmf_rule_and_json_round_trip(vgg, x28):
    plan = ts.make_plan(vgg, "auto", x28, rank_rule="vbmf", vbmf_factor=0.5)
    assert plan.goal == {"rank_rule": "vbmf", "vbmf_factor": 0.5, "objective": "macs"}
    for s in plan.compressed:
        w = vgg.get_submodule(s.name).weight
        want = vbmf_ranks(w, s.method, 0.5)
        assert tuple(s.rank) == want if s.method == "tucker" else s.rank == want
        assert "EVBMF" in s.reason
    back = CompressionPlan.from_json(plan.to_json())
    assert back == plan
    with pytest.raises(ValueError, match="layer features.0.*'vbmf' works for methods 'tucker' and 'svd'"):
        ts.make_plan(vgg, "cp", x28, rank_rule="vbmf")


@pytest.mark.parametrize("goal,err,msg", [
    (dict(rank_rule="nope"), ValueError, "known rank rules: manual, uniform, min_error"),
    (dict(rank_rule="vbmf", rate=4.0), ValueError, "rate= is a parameter of rank_rule='constant'"),
    (dict(rank_rule="constant", target_macs=0.5), ValueError, "rank_rule='constant' needs no goal"),
    (dict(rank_rule="min_error"), ValueError, "needs target_macs or target_params"),
    (dict(rank_rule="constant", rate=0.5), ValueError, "rate must be a number >= 1"),
    (dict(rank_rule="vbmf", vbmf_factor=2.0), ValueError, "vbmf_factor must be a number in \\[0, 1\\]"),
    (dict(rank_rule="accuracy_drop"), TypeError, "needs evaluate=callable"),
    (dict(), ValueError, "needs exactly one of"),
])
def test_bad_rules(vgg, x28, goal, err, msg):
    with pytest.raises(err, match=msg):
        ts.make_plan(vgg, "tucker", x28, **goal)


# --------------------------------------------------------------------------- accuracy drop
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean((2, 3)))


def test_accuracy_drop_respects_the_bound():
    from tensorslim.planning import collect_layers, rank_candidates
    from tensorslim.cost import count

    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # the dense model scores 1.0 on its own labels

    def evaluate(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).double().mean())

    drop = 0.1
    plan = ts.make_plan(model, "auto", x[:1], rank_rule="accuracy_drop", drop=drop, evaluate=evaluate)
    json.dumps(plan.to_dict())  # the callable is described, not stored
    assert plan.goal["evaluate"].startswith("<callable ") and plan.goal["drop"] == drop
    todo, _ = collect_layers(model, "auto", count(model, x[:1]), {})
    assert plan.compressed
    for layer in todo:
        spec = plan[layer.name]
        if not spec.compressed:
            continue
        alone = ts.compress(copy.deepcopy(model), CompressionPlan((spec,), spec.method), progress=False)
        measured = 1.0 - evaluate(alone)
        assert measured <= drop and f"accuracy drop {measured:.4f}" in spec.reason
        ranks = [r for r, _ in rank_candidates(layer, 1)]
        i = ranks.index(tuple(spec.rank) if isinstance(spec.rank, tuple) else spec.rank)
        if i > 0:  # one candidate cheaper breaks the bound (bisection evaluated it)
            lower = ts.make_plan(model, "auto", x[:1], ranks={layer.name: ranks[i - 1]})
            cheaper = ts.compress(copy.deepcopy(model), lower, progress=False)
            assert 1.0 - evaluate(cheaper) > drop


# --------------------------------------------------------------------------- command line
def test_cli_compress_with_rank_rule_vbmf(tmp_path, capsys):
    from tensorslim.cli import main

    torch.manual_seed(0)
    dense = models.create("vgg16", width=0.125)
    torch.save(dense.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "c"
    assert main(["compress", "--model", "vgg16", "--width", "0.125", "--weights", str(tmp_path / "w.pt"),
                 "--method", "auto", "--rank-rule", "vbmf", "--vbmf-factor", "0.5", "--test-subset", "50",
                 "--latency-batch", "2", "--threads", "1", "--out", str(out)]) == 0
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.goal["rank_rule"] == "vbmf" and plan.goal["vbmf_factor"] == 0.5
    assert plan.compressed and plan.macs_ratio < 1
    for s in plan.compressed:
        want = vbmf_ranks(dense.get_submodule(s.name).weight, s.method, 0.5)
        assert (tuple(s.rank) if s.method == "tucker" else s.rank) == want
    assert "EVBMF rank" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--rank-rule", "constant", "--rate", "0.5"], "rate must be a number >= 1"),
    (["--rank-rule", "min_error"], "one of the arguments --ranks --target-macs --target-params --target-latency --energy --lam is required"),
    (["--target-macs", "0.5", "--vbmf-factor", "0.5"], "vbmf_factor= is a parameter of rank_rule='vbmf'"),
    (["--rank-rule", "bogus"], "invalid choice: 'bogus'"),
])
def test_cli_bad_rank_rule_arguments_exit_2(tmp_path, capsys, argv, msg):
    from tensorslim.cli import main

    torch.save(models.create("vgg16", width=0.125).state_dict(), tmp_path / "w.pt")
    base = ["compress", "--model", "vgg16", "--width", "0.125", "--weights", str(tmp_path / "w.pt"),
            "--test-subset", "20", "--latency-batch", "1", "--threads", "1", "--out", str(tmp_path / "o")]
    try:
        code = main(base + argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert msg in capsys.readouterr().err

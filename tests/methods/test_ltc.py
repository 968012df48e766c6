"""LTC (learned Tucker-2 ranks by learning-compression): penalty gradient, LC behaviour on a
toy model, plan/model agreement, lam extremes, resume, validation, one real Fashion-MNIST run."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers import LowRankConv2d, LowRankLinear, TuckerConv2d
from tensorslim.methods import _ltc_core as core
from tensorslim.methods.ltc import LTCOptions, ltc

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _toy() -> nn.Module:
    """A small conv net whose kernels have decaying channel spectra (as trained ones do)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.view(m.weight.shape[0], m.weight.shape[1], -1)
                d_out = 0.8 ** torch.arange(w.shape[0], dtype=w.dtype)
                d_in = 0.8 ** torch.arange(w.shape[1], dtype=w.dtype)
                w.mul_(d_out[:, None, None] * d_in[None, :, None] * 4)
    return net


def _batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


# the LC mechanics on the toy model are tested with label-only W-steps (no dense teacher)
RUN = dict(target_macs=0.4, lc_steps=5, steps_per_lc_step=8, mu0=0.05, mu_growth=2.5, lr=0.05,
           bn_steps=0, wstep_distill=False, progress=False)


@pytest.fixture(scope="module")
def toy_run():
    return ltc(_toy(), X, train_loader=_batches(), **RUN)


def test_penalty_hook_adds_the_augmented_lagrangian_gradient():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    theta, phi = torch.randn_like(w), torch.randn_like(w)
    mu = 0.7
    ref = torch.autograd.grad((w ** 3).sum() + mu / 2 * ((w - theta - phi / mu) ** 2).sum(), w)[0]
    h = w.register_hook(core.Penalty(w, theta, phi, mu))
    got = torch.autograd.grad((w ** 3).sum(), w)[0]
    h.remove()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_growing_mu_pulls_w_onto_its_projection(toy_run):
    hist = (toy_run.initial,) + toy_run.history  # the initial C-step, then one per LC step
    assert [h["step"] for h in hist] == list(range(6))
    assert [h["mu"] for h in hist] == pytest.approx([0.05, 0.05, 0.125, 0.3125, 0.78125, 1.953125])
    dist = [h["dist"] for h in hist]
    assert all(b < a for a, b in zip(dist[1:], dist[2:]))  # decreasing across LC steps
    assert dist[-1] < 0.25 * dist[0]
    for h in hist:  # every C-step meets the target (bisection on lam), within 2%
        assert 0.98 * 0.4 <= h["cost_ratio"] <= 0.4
    assert all(h["loss"] > 0 for h in hist[1:]) and hist[0]["loss"] is None


def test_plan_matches_the_model_and_the_learned_ranks(toy_run, tmp_path):
    res, dense = toy_run, _toy()
    plan = res.plan
    c = ts.count(res.model, X[:1])
    assert (plan.params_after, plan.macs_after) == (c.total_params, c.total_macs)
    assert plan.macs_before == ts.count(dense, X[:1]).total_macs
    assert 0.98 * 0.4 <= plan.macs_ratio <= 0.4
    assert plan.macs_ratio == pytest.approx(res.history[-1]["cost_ratio"], rel=1e-12)
    last = res.history[-1]["ranks"]
    for s in plan.layers:
        r = last[s.name]
        assert (s.method == "keep") == (r is None)
        if r is not None:
            assert list(s.rank) == r if isinstance(s.rank, tuple) else s.rank == r
            kind = {"0": TuckerConv2d, "3": TuckerConv2d, "5": TuckerConv2d, "7": LowRankConv2d,
                    "11": LowRankLinear}[s.name]
            assert isinstance(res.model.get_submodule(s.name), kind)
    assert plan.goal["target_macs"] == 0.4 and plan.goal["mu"] == pytest.approx(1.953125)
    assert plan.goal["lam"] == res.history[-1]["lam"]
    assert json.loads(plan.to_json()) == json.loads(ts.CompressionPlan.from_json(plan.to_json()).to_json())
    ts.save(res.model, plan, tmp_path / "ckpt")
    again = ts.load(tmp_path / "ckpt", model=_toy()).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X), res.model(X), rtol=0, atol=0)


def test_compressed_layers_run_theta_the_last_projection(tmp_path):
    """Without recovery every factorized layer holds the last C-step's Theta (as saved in the
    state folder), whose channel ranks are the planned (r_in, r_out)."""
    from safetensors.torch import load_file

    res = ltc(_toy(), X, train_loader=_batches(), state_dir=tmp_path, **{**RUN, "lc_steps": 2})
    thetas = load_file(str(tmp_path / "step_2.safetensors"))
    assert res.plan.compressed
    for s in res.plan.compressed:
        layer, theta = res.model.get_submodule(s.name), thetas[f"theta.{s.name}"]
        if isinstance(layer, TuckerConv2d):
            kernel = torch.cat([t.to_tensor() for t in layer.to_tucker()]).float()
            ri, ro = s.rank
            sv_out = torch.linalg.svdvals(theta.double().reshape(theta.shape[0], -1))
            sv_in = torch.linalg.svdvals(theta.double().transpose(0, 1).reshape(theta.shape[1], -1))
            assert int((sv_out > 1e-5 * sv_out[0]).sum()) == ro
            assert int((sv_in > 1e-5 * sv_in[0]).sum()) == ri
        else:
            kernel = layer.to_svd()
            kernel = torch.cat([p.to_tensor() for p in kernel]) if isinstance(kernel, list) else kernel.to_tensor()
            sv = torch.linalg.svdvals(theta.double().reshape(theta.shape[0], -1))
            assert int((sv > 1e-5 * sv[0]).sum()) == s.rank
        torch.testing.assert_close(kernel.reshape(theta.shape).float(), theta, rtol=0, atol=2e-5)


def test_w_step_distils_from_the_dense_model():
    """With ``distill_alpha=1`` the W-step loss is the KD loss alone, so the labels do not
    matter; without W-step distillation (or with alpha 0.5) they do. The recorded loss of
    LC step 1 is train()'s mean KD loss of the first W-step."""
    # price "weight": the hand-made C-step below is the unweighted one
    base = {**RUN, "lc_steps": 2, "steps_per_lc_step": 3, "finetune_steps": 0, "price": "weight"}
    batches = _batches(3)
    flipped = [(x, (y + 3) % 10) for x, y in batches]

    def run(data, **kw):
        res = ltc(_toy(), X, train_loader=data, **{**base, **kw})
        return [h["loss"] for h in res.history], res.model.state_dict()

    for kw, same in (({"wstep_distill": True, "distill_alpha": 1.0}, True),
                     ({"wstep_distill": True, "distill_alpha": 0.5}, False),
                     ({"wstep_distill": False}, False)):
        (la, sa), (lb, sb) = run(batches, **kw), run(flipped, **kw)
        assert (la == lb and all(torch.equal(sa[k], sb[k]) for k in sa)) is same, kw
    # the KD-only loss of LC step 1 equals train() on the same copy, hooks and teacher
    loss = run(batches, wstep_distill=True, distill_alpha=1.0, distill_T=2.0)[0][0]
    from tensorslim.methods._musco_state import _StageLoader
    from tensorslim.train import train

    opts = LTCOptions(**{k: v for k, v in base.items() if k != "progress"})
    work, teacher = _toy(), _toy().eval()
    ranks, thetas, _ = core.c_step([core.price(l, "macs", ts.count(work, X[:1]).total_macs,
                                               opts.pairs, opts.rank_error)
                                    for l in _layers(work)], work, {}, opts.mu(0), None,
                                   _toy_budget(work, 0.4))
    for name, theta in thetas.items():
        w = work.get_submodule(name).weight
        w.register_hook(core.Penalty(w, theta, torch.zeros_like(theta), opts.mu(1)))
    hist = train(work, _StageLoader(batches, 10_000), steps=3, lr=0.05, schedule="constant",
                 momentum=0.9, weight_decay=0.0, teacher=teacher, distill_alpha=1.0,
                 distill_T=2.0, seed=1, progress=False, log_every=0)
    assert loss == pytest.approx(hist["loss"][-1], rel=1e-6)


def _layers(model):
    from tensorslim.planning import collect_layers

    return collect_layers(model, "auto", ts.count(model, X[:1]), {"include": None, "exclude": None})[0]


def _toy_budget(model, target):
    total = ts.count(model, X[:1]).total_macs
    return core.budget(target, None, "macs", [core.price(l, "macs", total) for l in _layers(model)])


def test_lambda_zero_keeps_every_layer_and_a_huge_lambda_gives_minimum_ranks():
    base = dict(lc_steps=1, steps_per_lc_step=1, bn_steps=0, progress=False)
    zero = ltc(_toy(), X, train_loader=_batches(2), lam=0.0, **base)
    assert not zero.plan.compressed and zero.plan.macs_ratio == 1.0
    assert len(zero.history) == 1 and all(r is None for r in zero.history[-1]["ranks"].values())
    big = ltc(_toy(), X, train_loader=_batches(2), lam=1e12, **base)
    ranks = {s.name: s.rank for s in big.plan.compressed}
    assert ranks == {"0": (1, 1), "3": (1, 1), "5": (1, 1), "7": 1, "11": 1}


def test_interrupted_run_resumes_to_the_same_plan_and_weights(toy_run, tmp_path):
    state = tmp_path / "state"
    part = ltc(_toy(), X, train_loader=_batches(), state_dir=state, max_lc_steps_this_call=2, **RUN)
    assert len(part.history) == 2 and json.loads((state / "state.json").read_text())["step"] == 2
    assert [h["ranks"] for h in part.history] == [h["ranks"] for h in toy_run.history[:2]]
    done = ltc(_toy(), X, train_loader=_batches(), state_dir=state, **RUN)
    assert done.plan == toy_run.plan
    assert len(done.history) == 5 and done.initial["ranks"] == toy_run.initial["ranks"]
    assert [h["ranks"] for h in done.history] == [h["ranks"] for h in toy_run.history]
    assert [h["dist"] for h in done.history] == pytest.approx([h["dist"] for h in toy_run.history], rel=1e-6)
    a, b = done.model.state_dict(), toy_run.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other settings.*mu0"):
        ltc(_toy(), X, train_loader=_batches(), state_dir=state, **{**RUN, "mu0": 0.1})
    other = _toy()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="different dense model"):
        ltc(other, X, train_loader=_batches(), state_dir=state, **RUN)


def test_bad_settings_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="exactly one of lam, target_macs, target_params"):
        LTCOptions(lam=1.0, target_macs=0.5)
    with pytest.raises(ValueError, match="target_macs must be a number in"):
        LTCOptions(target_macs=1.5)
    with pytest.raises(ValueError, match="objective must be 'macs'.*as target_params"):
        LTCOptions(target_params=0.5, objective="macs")
    with pytest.raises(ValueError, match="mu_growth must be a number >= 1"):
        LTCOptions(lam=1.0, mu_growth=0.5)
    with pytest.raises(ValueError, match="needs a train_loader"):
        ltc(_toy(), X, target_macs=0.5)
    with pytest.raises(ValueError, match="target_macs=0.01 is unreachable"):
        ltc(_toy(), X, train_loader=_batches(), target_macs=0.01, progress=False)
    with pytest.raises(TypeError, match="unknown setting"):
        ltc(_toy(), X, train_loader=_batches(), target_macs=0.5, mu=1.0)
    assert LTCOptions(target_params=0.5).objective == "params"


def test_real_fashion_mnist_run_meets_the_mac_target():
    """The shipped VGG-16 (width 0.25, 94% test accuracy) to half its MACs with 30 SGD steps
    on 384 real training images, scored on 1,000 official test images."""
    from tensorslim.data import TensorBatchLoader, make_loaders
    from tensorslim.train import evaluate

    loaders = make_loaders(32, val_size=100, subset=384, seed=0)
    test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(1000)), 500)
    dense = ts.models.load_pretrained("vgg16")
    res = ltc(dense, torch.zeros(1, 1, 28, 28), train_loader=loaders.train, target_macs=0.5,
              lc_steps=3, steps_per_lc_step=10, mu0=0.05, mu_growth=3.0, bn_steps=4,
              progress=False)
    assert 0.98 * 0.5 <= res.plan.macs_ratio <= 0.5
    acc = evaluate(res.model, test)["accuracy"]
    print(f"ltc vgg16 0.5 MACs: test accuracy {acc:.4f}, MACs ratio {res.plan.macs_ratio:.4f}")
    assert acc >= 0.85, acc


def test_bilinear_pricing_equals_the_planner_pricing_of_every_pair():
    from tensorslim.planning import collect_layers
    from tensorslim.planning.candidates import layer_cost

    net = nn.Sequential(nn.Conv2d(24, 20, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(20, 16, 3))
    x = torch.zeros(1, 24, 9, 9)
    todo, _ = collect_layers(net, "auto", ts.count(net, x), {})
    for layer in todo:
        for obj, i in (("params", 0), ("macs", 1)):
            priced = core.price(layer, obj, 1000.0)
            ri, ro = priced.cost.shape
            assert ri * ro > core._GRID_DIRECT  # the bilinear fill is what is tested
            direct = torch.tensor([[layer_cost(layer, (a, b))[i] for b in range(1, ro + 1)]
                                   for a in range(1, ri + 1)], dtype=torch.float64)
            torch.testing.assert_close(priced.cost * 1000.0, direct, rtol=0, atol=1e-9)
            assert priced.dense_cost * 1000.0 == (layer.params, layer.macs)[i]


# ---- the C-step's rank price (tensorslim.methods._ltc_price) ------------------------------

def _small() -> tuple[nn.Module, torch.Tensor]:
    """A float64 conv + Linear net small enough to price every candidate by brute force."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 30)).double().eval()
    with torch.no_grad():  # decaying channel spectra: the price reaches intermediate ranks
        for m in (net[0], net[2], net[6]):
            w = m.weight.view(m.weight.shape[0], m.weight.shape[1], -1)
            w.mul_(3 * (0.7 ** torch.arange(w.shape[0], dtype=w.dtype))[:, None, None]
                   * (0.7 ** torch.arange(w.shape[1], dtype=w.dtype))[None, :, None])
    return net, torch.randn(1, 3, 6, 6, dtype=torch.float64)


def _brute(layer, w: torch.Tensor, s: float, lam: float, mu: float):
    """(best objective, rank, Theta) over every candidate rank and the dense layer, each
    candidate projected and its error measured directly (no spectra of the C-step)."""
    def left(m, r):
        return torch.linalg.svd(m, full_matrices=False)[0][:, :r]

    best = (lam * layer.dense_cost, None, w)  # dense: no error, ties go to dense
    for idx in range(layer.cost.numel()):
        rank = core._unflat(layer, idx)
        if float(layer.cost.reshape(-1)[idx]) >= layer.dense_cost:
            continue
        if layer.tucker:
            a_out = left(w.reshape(w.shape[0], -1), rank[1])
            a_in = left(w.transpose(0, 1).reshape(w.shape[1], -1), rank[0])
            theta = torch.einsum("ta,ua,usk,sb,vb->tvk", a_out, a_out, w.reshape(*w.shape[:2], -1),
                                 a_in, a_in).reshape(w.shape)
        else:
            u, sv, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
            theta = ((u[:, :rank] * sv[:rank]) @ vh[:rank]).reshape(w.shape)
        obj = lam * float(layer.cost.reshape(-1)[idx]) + mu / 2 * s * float(((w - theta) ** 2).sum())
        if obj < best[0] - 1e-12:
            best = (obj, rank, theta)
    return best


def test_weighted_c_step_equals_brute_force_over_every_rank():
    """The C-step with per-layer price weights s_k picks, per layer, the rank minimising
    lam C_k(r) + mu/2 s_k ||W_k - Pi_r(W_k)||^2 over every candidate (float64, errors of
    explicit projections), and Theta is that projection; the weights change the choice."""
    net, x = _small()
    total = ts.count(net, x).total_params  # params: the Linear's cost is not negligible
    layers = [core.price(l, "params", total) for l in _layers_of(net, x)]
    norms = {l.name: float(net.get_submodule(l.name).weight.detach().square().sum()) for l in layers}
    mu, differs, seen = 0.3, False, {l.name: set() for l in layers}
    for weights in (None, {n: 2.0 / v for n, v in norms.items()}, {"0": 0.05, "2": 9.0, "6": 1.0}):
        for lam in torch.logspace(-4, 1, 16, dtype=torch.float64).tolist():
            ranks, thetas, got = core.c_step(layers, net, {}, mu, lam, None, weights)
            assert got == lam
            for l in layers:
                w = net.get_submodule(l.name).weight.detach()
                s = 1.0 if weights is None else weights[l.name]
                obj, rank, theta = _brute(l, w, s, lam, mu)
                assert ranks[l.name] == rank, (weights, lam, l.name)
                torch.testing.assert_close(thetas[l.name], theta, rtol=0, atol=1e-10)
                assert core.rank_cost(l, rank) * lam + mu / 2 * s * float(((w - theta) ** 2).sum()) \
                    == pytest.approx(obj, rel=1e-9, abs=1e-12)
                seen[l.name].add(rank)
            if weights is not None:
                differs |= ranks != core.c_step(layers, net, {}, mu, lam, None, None)[0]
    assert differs
    for name, ranks_seen in seen.items():  # every layer: dense, its smallest rank and between
        smallest = (1, 1) if name != "6" else 1
        assert None in ranks_seen and smallest in ranks_seen and len(ranks_seen) >= 3, (name, ranks_seen)


def _layers_of(model, x):
    from tensorslim.planning import collect_layers

    return collect_layers(model, "auto", ts.count(model, x), {"include": None, "exclude": None})[0]


def test_price_weights_are_the_documented_sensitivities():
    from tensorslim.methods import _ltc_price as pr

    net, x = _small()
    total = ts.count(net, x).total_macs
    layers = [core.price(l, "macs", total) for l in _layers_of(net, x)]
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]
    ws = {l.name: net.get_submodule(l.name).weight for l in layers}
    norms = {n: float(w.detach().square().sum()) for n, w in ws.items()}

    def normed(raw):  # sum_k s_k ||W_k||^2 = sum_k ||W_k||^2
        c = sum(norms.values()) / sum(raw[n] * norms[n] for n in norms)
        return {n: raw[n] * c for n in raw}

    expect = {"weight": dict.fromkeys(norms, 1.0), "relative": normed({n: 1 / v for n, v in norms.items()})}
    fisher = dict.fromkeys(norms, 0.0)
    for xb, yb in data[:2]:  # price_batches = 2: the first two batches
        grads = torch.autograd.grad(nn.functional.cross_entropy(net(xb), yb), list(ws.values()))
        for n, gr in zip(ws, grads):
            fisher[n] += float(gr.square().mean()) / 2
    expect["fisher"] = normed(fisher)
    meas, before = {}, {n: w.detach().clone() for n, w in ws.items()}
    with torch.no_grad():
        ref = [net(xb) for xb, _ in data[:2]]
        for l in layers:
            w, frac = ws[l.name], 0.5
            _, rank, theta = min(((float(((w - t) ** 2).sum()), str(r), t) for r, t in _candidates(l, w)
                                  if core.rank_cost(l, r) <= frac * l.dense_cost), key=lambda z: z[0])
            w.copy_(theta)
            change = sum(float((net(xb) - r).square().sum()) for (xb, _), r in zip(data[:2], ref))
            w.copy_(before[l.name])
            meas[l.name] = change / 16 / float(((before[l.name] - theta) ** 2).sum())
    expect["measured"] = normed(meas)
    for price, want in expect.items():
        got = pr.layer_weights(price, net, layers, data, 2, 0.5)
        assert got.keys() == want.keys()
        for n in want:
            assert got[n] == pytest.approx(want[n], rel=1e-9), (price, n)
        for n, w in ws.items():  # the weights are left as they were
            assert torch.equal(w.detach(), before[n])
    with pytest.raises(ValueError, match="price must be one of weight, relative, fisher, measured"):
        LTCOptions(lam=1.0, price="hessian")


def _candidates(layer, w):
    """Every candidate rank of ``layer`` with its projection of ``w`` (the C-step's Theta)."""
    spec = core.spectrum(layer, w)
    return [(core._unflat(layer, i), core.project(layer, spec, w.detach(), core._unflat(layer, i)))
            for i in range(layer.cost.numel())]


def test_the_price_is_recorded_in_the_plan_and_the_result(toy_run):
    from tensorslim.methods import _ltc_price as pr

    assert LTCOptions(lam=1.0).price == "relative"  # the default (see the report for why)
    weights = toy_run.initial["price_weights"]
    assert toy_run.plan.goal["price"] == "relative" and toy_run.plan.goal["ltc"]["price"] == "relative"
    assert toy_run.plan.goal["price_weights"] == weights
    net = _toy()
    total = ts.count(net, X[:1]).total_macs
    d = LTCOptions(lam=1.0)  # the default Tucker-2 candidates and rank error
    assert (d.pairs, d.rank_error) == ("proportional", "bound")
    assert (toy_run.plan.goal["pairs"], toy_run.plan.goal["rank_error"]) == ("proportional", "bound")
    layers = [core.price(l, "macs", total, d.pairs, d.rank_error) for l in _layers(net)]
    assert weights == pytest.approx(pr.layer_weights("relative", net, layers, [], 1, 0.4), rel=1e-12)
    # the initial C-step is the weighted one at mu0 on the dense weights
    ranks = core.c_step(layers, net, {}, RUN["mu0"], None, _toy_budget(net, 0.4), weights)[0]
    assert {n: (list(r) if isinstance(r, tuple) else r) for n, r in ranks.items()} == toy_run.initial["ranks"]

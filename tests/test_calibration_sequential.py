"""Sequential (error-propagating) calibration: the closed-form update equals brute-force
least squares / reduced-rank regression in float64, the layer fit sees the partially
compressed model's inputs, passes stop early and group layers that share an input, and the
last layer's fit provably lowers the model's output error."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim._calib_sequential import PairStats, call_order, closed_form_target, fit_layer, sequential_layers
from tensorslim.calibration import Calibration, calibrate
from tensorslim.layers import LowRankLinear
from tensorslim.plan import CompressionPlan
from tensorslim.surgery import build_layer


def _pair(seed: int = 0, rows: int = 300, n: int = 12, m: int = 9):
    """Correlated dense inputs x, compressed inputs x^ = x P + noise (rows paired), W, b."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix + 0.5
    xh = x @ (torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64)) \
        + 0.05 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    st = PairStats(n, True)
    st.add(xh[:100], x[:100], None)
    st.add(xh[100:], x[100:], None)
    return x, xh, w, b, st


def _spec(lin: nn.Linear, rank: int):
    plan = ts.make_plan(nn.Sequential(lin), "svd", torch.randn(2, lin.in_features, dtype=lin.weight.dtype),
                        ranks={"0": rank})
    return plan.layers[0]


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_closed_form_target_is_the_brute_force_least_squares(damping):
    x, xh, w, b, st = _pair()
    w0, b0, metric, mu_hat = closed_form_target(w, b, st, damping)
    n = x.shape[1]
    xc = xh - xh.mean(0)
    lam = damping * float((xc.T @ xc).diagonal().mean())
    # rows [x^_i, 1] -> W x_i + b, and damping rows [sqrt(lam) e_j, 0] -> sqrt(lam) W[:, j]
    design = torch.cat([torch.cat([xh, torch.ones(len(xh), 1, dtype=xh.dtype)], 1),
                        torch.cat([lam ** 0.5 * torch.eye(n, dtype=xh.dtype), torch.zeros(n, 1, dtype=xh.dtype)], 1)])
    target = torch.cat([x @ w.T + b, lam ** 0.5 * w.T])
    sol = torch.linalg.lstsq(design, target, driver="gelsd").solution
    torch.testing.assert_close(w0, sol[:n].T, rtol=0, atol=1e-9)
    torch.testing.assert_close(b0 + w0 @ mu_hat - w0 @ mu_hat, sol[n], rtol=0, atol=1e-9)
    torch.testing.assert_close(mu_hat, xh.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(metric, xc.T @ xc + lam * torch.eye(n, dtype=xh.dtype), rtol=1e-12, atol=1e-9)


def test_closed_form_target_is_the_dense_weight_when_inputs_are_unchanged():
    x, _, w, b, _ = _pair()
    st = PairStats(x.shape[1], True)
    st.add(x, x, None)
    w0, b0, *_ = closed_form_target(w, b, st, 0.03)
    torch.testing.assert_close(w0, w, rtol=0, atol=1e-10)
    torch.testing.assert_close(b0, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.02])
def test_outputs_fit_at_low_rank_is_the_reduced_rank_regression_optimum(damping):
    x, xh, w, b, st = _pair(seed=1)
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w), lin.bias.copy_(b)
    k = 4
    layer = fit_layer(lin, _spec(lin, k), st, "outputs", build=build_layer, damping=damping)
    got_w = layer.project_out.weight @ layer.project_in.weight
    # reference (classical RRR on the augmented centred problem): B_k = B_ols V_k V_k^T, V_k the
    # top right singular vectors of the fitted values Z B_ols
    n = x.shape[1]
    zc, yc = xh - xh.mean(0), (x - x.mean(0)) @ w.T
    lam = damping * float((zc.T @ zc).diagonal().mean())
    z = torch.cat([zc, lam ** 0.5 * torch.eye(n, dtype=x.dtype)])
    y = torch.cat([yc, lam ** 0.5 * w.T])
    b_ols = torch.linalg.lstsq(z, y, driver="gelsd").solution
    v = torch.linalg.svd(z @ b_ols, full_matrices=False).Vh[:k].T
    ref_w = (b_ols @ v @ v.T).T
    torch.testing.assert_close(got_w.detach(), ref_w, rtol=0, atol=1e-8)
    ref_b = b + w @ x.mean(0) - ref_w @ xh.mean(0)
    torch.testing.assert_close(layer.project_out.bias.detach(), ref_b, rtol=0, atol=1e-8)
    # the recorded output error is the true one on the calibration rows (damping left out)
    out = xh @ got_w.detach().T + layer.project_out.bias.detach()
    true = float((out - (x @ w.T + b)).norm() / ((x - x.mean(0)) @ w.T).norm())
    assert layer.output_error == pytest.approx(true, rel=1e-8)


class _Chain(nn.Module):
    """q, k, v share one input; o mixes them; f is the output layer."""

    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o, self.f = (nn.Linear(n, n) for _ in range(5))

    def forward(self, x):
        h = torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x)
        return self.f(x + torch.relu(self.o(h)))


def _chain_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = _Chain().double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(10, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 10, dtype=torch.float64)
    return model, [torch.randn(5, 7, 10, generator=g, dtype=torch.float64) @ mix for _ in range(3)]


def test_layers_sharing_an_input_form_one_group_and_passes_stop_early():
    from tensorslim._calib_sequential import _capture

    model, xs = _chain_and_data()
    groups, calls = call_order(model, xs[0], ["f", "o", "v", "k", "q"], None)
    assert groups == [["q", "k", "v"], ["o"], ["f"]] and set(calls.values()) == {1}
    ran = []
    h = model.f.register_forward_pre_hook(lambda *_: ran.append(1))
    got = _capture(model, xs[0], {"o": model.o}, calls, None)
    h.remove()
    assert ran == [] and len(got["o"]) == 1  # stopped before f ran


def _plan(model, xs, ranks):
    return ts.make_plan(model, "svd", xs[0], ranks=ranks)


def _out_err(model, dense, xs) -> float:
    with torch.no_grad():
        return sum(float((model(x) - dense(x)).square().sum()) for x in xs)


def test_inputs_mode_fits_each_layer_on_the_partially_compressed_inputs():
    model, xs = _chain_and_data()
    plan = _plan(model, xs, {"q": 3, "k": 3, "v": 3, "o": 4, "f": 4})
    got = ts.compress(copy.deepcopy(model), plan, calibration=calibrate(model, xs, error="relative", sequential="inputs"))
    # reference, by hand: q, k, v whitened on the dense inputs, then o on the inputs the model
    # with q, k, v compressed gives it, then f with q, k, v, o compressed
    ref = copy.deepcopy(model)
    for group in (["q", "k", "v"], ["o"], ["f"]):
        cal = calibrate(ref, xs, layers=group, error="relative", sequential="off")
        for name in group:
            spec = next(s for s in plan.layers if s.name == name)
            setattr(ref, name, LowRankLinear.from_dense(getattr(model, name), spec.rank, **cal.layer_options(name)))
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(got(x), ref(x), rtol=0, atol=1e-10)


def test_outputs_mode_lowers_the_last_layers_error_and_is_exact_at_full_rank():
    model, xs = _chain_and_data(seed=3)
    plan = _plan(model, xs, {"o": 3, "f": 3})
    off = ts.compress(copy.deepcopy(model), plan, calibration=calibrate(model, xs, error="relative", sequential="off"),
                      progress=False)
    seq = ts.compress(copy.deepcopy(model), plan,
                      calibration=Calibration({}, sequential="outputs", damping=0.0, inputs=tuple(xs)))
    # o sees the dense inputs in both: with no damping both fit the same whitened SVD
    with torch.no_grad():
        torch.testing.assert_close(seq.o(xs[0]), off.o(xs[0]), rtol=0, atol=1e-9)
    # f is the output layer: given the same o, the closed-form update minimises the model's
    # output error over rank-3 f (whitening on dense inputs is one candidate of that minimum)
    assert _out_err(seq, model, xs) < _out_err(off, model, xs) - 1e-3
    full = _plan(model, xs, {n: 10 for n in "qkvof"})
    exact = ts.compress(copy.deepcopy(model), full, calibration=calibrate(model, xs, error="relative",
                                                                           sequential="outputs"))
    assert _out_err(exact, model, xs) < 1e-18


def test_padding_rows_are_left_out_and_hf_style_dict_batches_work():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8).double()

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = emb, nn.Linear(8, 8).double(), nn.Linear(8, 4).double()

        def forward(self, input_ids, attention_mask):
            return self.b(torch.relu(self.a(self.emb(input_ids))))

    model = Tok().eval()
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    plan = ts.make_plan(model, "svd", (ids, mask), ranks={"a": 2, "b": 2})
    layers = sequential_layers(model, [s for s in plan.layers if s.compressed], batches, "outputs",
                               build=build_layer)
    # stats of b by hand, padded rows (2 of 18) removed: equal to fit_layer on them
    with torch.no_grad():
        hid = torch.relu(layers["a"](emb(ids)))[mask.bool()]
        dense_hid = torch.relu(model.a(emb(ids)))[mask.bool()]
    st = PairStats(8, True)
    st.add(hid, dense_hid, None)
    assert st.samples == 16  # 18 positions, 2 padded
    spec = next(s for s in plan.layers if s.name == "b")
    ref = fit_layer(model.b, spec, st, "outputs", build=build_layer)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(layers["b"](x), ref(x), rtol=0, atol=1e-10)


def test_validation():
    model, xs = _chain_and_data()
    plan = _plan(model, xs, {"f": 2})
    with pytest.raises(ValueError, match="mode must be one of"):
        sequential_layers(model, plan.compressed, xs, "sideways", build=build_layer)
    with pytest.raises(ValueError, match="no calibration batches"):
        sequential_layers(model, plan.compressed, [], "inputs", build=build_layer)
    with pytest.raises(ValueError, match="sequential"):
        calibrate(model, xs, error="relative", sequential="both")
    with pytest.raises(ValueError, match="damping"):
        Calibration({}, damping=-1.0)
    with pytest.raises(ValueError, match="needs the calibration batches"):
        Calibration({}, sequential="inputs")
    with pytest.raises(TypeError, match="CompressionPlan"):
        ts.compress(model, {"f": 2}, calibration=xs)
    assert calibrate(model, xs, error="relative", sequential="outputs").inputs == tuple(xs)
    assert isinstance(plan, CompressionPlan)

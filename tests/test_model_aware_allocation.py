"""Rank allocation by what a layer's error does to the MODEL's outputs (calibration errors
``output``, ``fisher``, ``measured``): exact curves against brute force, and on a model where
one layer's output is added into a large residual stream, the allocation matches brute force
over all allocations while the layer-relative error does not."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorslim as ts
from tensorslim.calibration import calibrate, with_error
from tensorslim.sensitivity import measure_truncation, output_sensitivity
from tensorslim.layers import LowRankLinear
from tensorslim.surgery import set_submodule
from tensorslim.tensor import output_error_curve, whitened_svd


class _Residual(nn.Module):
    """``a`` writes into a stream 20x its size, then LayerNorm (its error is damped); ``b``
    writes the output directly. Same shapes, same kind of weights."""

    def __init__(self, n: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, n)
        with torch.no_grad():
            for lin in (self.a, self.b):  # decaying spectra: truncation error grows smoothly
                u, _, v = torch.linalg.svd(torch.randn(n, n))
                lin.weight.copy_((u * torch.logspace(0, -1.5, n)) @ v)

    def forward(self, x):
        h = F.layer_norm(20 * x + self.a(x), x.shape[-1:])
        return self.b(h)


def _data(seed: int = 0, n: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 10, n, generator=g, dtype=torch.float64) for _ in range(4)]


def _compressed(model: nn.Module, cal, ranks: dict) -> nn.Module:
    out = copy.deepcopy(model)
    for name, r in ranks.items():
        if r is not None:
            set_submodule(out, name, LowRankLinear.from_dense(getattr(model, name), r, **cal.layer_options(name)))
    return out


@torch.no_grad()
def _error(model: nn.Module, other: nn.Module, xs) -> float:
    return sum(float((model(x) - other(x)).square().sum()) for x in xs)


@torch.no_grad()
def test_weighted_curve_is_the_weighted_output_error_of_each_truncation():
    torch.manual_seed(0)
    w = torch.randn(7, 9, dtype=torch.float64)
    x = torch.randn(300, 9, dtype=torch.float64) * torch.logspace(0, 1, 9)
    energy = torch.rand(7, dtype=torch.float64) * 3
    curve = output_error_curve(w, x.T @ x, row_energy=energy, relative=False)
    full = whitened_svd(w, x.T @ x)
    for k in range(8):
        approx = full.truncate(k).to_tensor() if k else torch.zeros_like(w)
        err = float(((x @ (w - approx).T).square() * energy).sum())
        assert abs(float(curve[k]) - err) < 1e-8 * float(curve[0])
    assert float(curve[-1]) == 0.0
    plain = output_error_curve(w, x.T @ x, relative=False)
    assert torch.allclose(plain / plain[0], output_error_curve(w, x.T @ x), atol=1e-12)


@torch.no_grad()
def test_output_error_is_the_summed_output_error_of_the_data_aware_layer():
    torch.manual_seed(1)
    m, xs = _Residual().double(), _data()
    cal = calibrate(m, xs, error="output")
    curve = cal.error_curve("b", m.b.weight)
    hs = [F.layer_norm(20 * x + m.a(x), (16,)) for x in xs]
    for r in (2, 5, 9):
        low = LowRankLinear.from_dense(m.b, r, **cal.layer_options("b")).double()
        ref = sum(float((low(h) - m.b(h)).square().sum()) for h in hs)
        assert abs(float(curve[r]) - ref) < 1e-8 * float(curve[0])


def test_output_sensitivity_is_the_squared_jacobian_column_norm():
    """For out = B (A x + c): the gradient of r.out w.r.t. A's output is B^T r, whose squared
    entries average (over Gaussian r) to the column norms of B; the layer B itself gets 1."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4)).double()
    xs = [torch.randn(50, 5, dtype=torch.float64) for _ in range(4)]
    e = output_sensitivity(m, xs, probes=100)
    ref = m[1].weight.square().sum(0)
    assert torch.allclose(e["0"], ref, rtol=0.05)
    assert torch.allclose(e["1"], torch.ones(4, dtype=torch.float64), rtol=0.05)
    assert m[0].weight.grad is None


@torch.no_grad()
def test_measured_change_is_the_model_output_change_and_the_curve_passes_through_it():
    torch.manual_seed(3)
    m, xs = _Residual().double(), _data()
    cal = calibrate(m, xs, error="relative")
    got = measure_truncation(m, xs, {"a": [2, 6]}, cal.layer_options)["a"]
    rows = 4 * 6 * 10
    for j, r in enumerate((2, 6)):
        trial = _compressed(m, cal, {"a": r})
        assert abs(float(got[1][j]) - _error(trial, m, xs) / rows) < 1e-10 * max(1.0, float(got[1][j]))
    meas = with_error(cal, m, xs, "measured", sensitivity_batches=4)
    ranks, change = meas.measured["a"]
    curve = meas.error_curve("a", m.a.weight)
    samples = meas.stats["a"].samples
    for r, c in zip(ranks.tolist(), change.tolist()):
        assert abs(float(curve[r]) - c * samples) < 1e-9 * float(curve[0])  # exact where measured
    assert float(curve[-1]) == 0.0 and bool((curve[:-1] >= curve[1:] - 1e-12).all())


@pytest.mark.parametrize("error", ["fisher", "measured"])
def test_allocation_gives_rank_to_the_layer_that_matters_like_brute_force(error):
    torch.manual_seed(4)
    m, xs = _Residual().double().eval(), _data()
    held = _data(seed=7)
    example = xs[0]
    cands = [1, 2, 3, 4, 5, 6, 7]  # cheaper than dense for 16 x 16 (32 r + 16 params < 272)
    budget = 16 * 2 + 32 * 8  # rank 8 in all, biases kept
    total = 2 * (256 + 16)
    rel = calibrate(m, xs, error="relative")
    brute = min((_error(_compressed(m, rel, {"a": ra, "b": rb}), m, held), ra, rb)
                for ra, rb in itertools.product(cands, cands) if 32 * (ra + rb) + 32 <= budget)
    errs = {}
    for kind in ("relative", error):
        cal = with_error(rel, m, xs, kind, sensitivity_batches=4, probes=8)
        plan = ts.make_plan(m, "svd", example, target_params=budget / total, calibration=cal)
        assert plan.goal["calibration"]["error"] == kind
        ranks = {s.name: s.rank for s in plan.layers}
        assert plan.params_after <= budget
        errs[kind] = (_error(_compressed(m, cal, ranks), m, held), ranks["a"], ranks["b"])
    # the model-aware error puts the rank where the output feels it, as brute force does
    assert brute[2] > brute[1] and errs[error][2] > errs[error][1]
    assert errs[error][0] <= 1.05 * brute[0]
    assert errs["relative"][0] > 2 * brute[0]  # the layer-relative error splits the budget evenly


def test_bad_error_is_refused():
    m = _Residual()
    with pytest.raises(ValueError, match="unknown error 'energy'"):
        calibrate(m, [torch.randn(2, 16)], error="energy")
    with pytest.raises(ValueError, match="sensitivity_batches must be an int >= 1"):
        calibrate(m, [torch.randn(2, 16)], sensitivity_batches=0)
    with pytest.raises(ValueError, match="row_energy must be"):
        output_error_curve(torch.randn(3, 4), torch.eye(4), row_energy=torch.ones(4))


def test_layers_the_calibration_never_reaches_are_refused_for_absolute_errors():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):  # b only runs on batches larger than 2
            return self.b(self.a(x)) if x.shape[0] > 2 else self.a(x)

    m = Branch()
    small = [torch.randn(2, 16) for _ in range(2)]
    with pytest.raises(ValueError, match=r"needs every SVD Linear to be reached.*\['b'\]"):
        ts.make_plan(m, "svd", torch.randn(4, 16), target_params=0.5, calibration=small)
    plan = ts.make_plan(m, "svd", torch.randn(4, 16), target_params=0.5,
                        calibration=calibrate(m, small, error="relative", sequential="off"))
    assert plan.goal["calibration"] == {"variant": "whiten", "error": "relative", "batches": 2, "layers": 1}


def test_raw_batches_defer_the_sensitivity_until_a_plan_needs_it():
    from tensorslim.calibration import DEFAULT_ERROR, as_calibration

    torch.manual_seed(5)
    m, xs = _Residual().double().eval(), _data()
    lazy = as_calibration(m, iter(xs))
    assert lazy.error == DEFAULT_ERROR and not lazy.measured and not lazy._done  # nothing measured yet
    eager = calibrate(m, xs)
    assert torch.allclose(lazy.error_curve("a", m.a.weight), eager.error_curve("a", m.a.weight), rtol=1e-12)
    assert lazy.resolved() is lazy.resolved() and lazy.resolved().measured
    plan = ts.make_plan(m, "svd", xs[0], target_params=0.5, calibration=xs)
    assert plan.goal["calibration"]["error"] == DEFAULT_ERROR


def test_a_plan_with_convs_prices_everything_by_relative_error_and_measures_nothing(monkeypatch):
    # convs have no output-error curve (relative weight proxy): the Linear curves must be on
    # that scale, so the default 'measured' falls back to 'relative', says so, and runs nothing
    import tensorslim.sensitivity as sens

    def never(*a, **k):
        raise AssertionError("nothing should be measured")

    monkeypatch.setattr(sens, "measure_truncation", never)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                        nn.Linear(32, 10)).eval()
    x = torch.randn(8, 3, 12, 12)
    plan = ts.make_plan(cnn, "auto", x[:1], target_params=0.5, calibration=[x[:4], x[4:]])
    rec = plan.goal["calibration"]
    assert rec["error"] == "relative" and rec["layers"] == 2
    assert rec["note"].startswith("error 'measured' replaced by 'relative': 2 planned layers (0, 2)")
    assert abs(plan.params_after / plan.params_before - 0.5) < 0.05
    linears = [s for s in plan.layers if s.layer_type == "Linear" and s.compressed]
    assert len(linears) == 2 and all("relative output error" in s.reason for s in linears)
    assert {s.name: s.compressed for s in plan.layers}["2"]  # a conv competes on the same scale


class _Lookup(nn.Module):
    """A token table, then a Linear: (input_ids, attention_mask) -> (B, L, 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8).double()
        with torch.no_grad():  # a decaying spectrum
            u, _, v = torch.linalg.svd(torch.randn(30, 8, dtype=torch.float64), full_matrices=False)
            self.emb.weight.copy_((u * torch.logspace(0, -1, 8, dtype=torch.float64)) @ v)
        self.out = nn.Linear(8, 4).double()

    def forward(self, input_ids, attention_mask):
        return self.out(torch.tanh(self.emb(input_ids)))


def _token_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(3):
        ids = torch.randint(0, 30, (4, 6), generator=g) % (10 + 10 * k)  # skewed counts
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[k, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def test_embedding_curve_is_the_lookup_weighted_error_of_each_truncation():
    from tensorslim._calib_embedding import collect_token_counts, embedding_curve
    from tensorslim.layers import LowRankEmbedding

    model, batches = _Lookup(), _token_batches()
    ran = []
    h = model.out.register_forward_pre_hook(lambda *_: ran.append(1))
    counts = collect_token_counts(model, batches, ["emb", "out"])["emb"]
    h.remove()
    assert ran == []  # the passes stop after the lookup
    ref = sum(torch.bincount(b["input_ids"][b["attention_mask"].bool()], minlength=30) for b in batches)
    assert torch.equal(counts, ref.double())
    curve = embedding_curve(model.emb.weight, counts)
    w = model.emb.weight.double()
    for r in range(1, 8):
        low = LowRankEmbedding.from_dense(model.emb, r)(torch.arange(30))  # every row of the table
        brute = float((counts[:, None] * (w - low).square()).sum())
        assert float(curve[r]) == pytest.approx(brute, rel=1e-9, abs=1e-12)
    assert float(curve[0]) == pytest.approx(float((counts[:, None] * w.square()).sum()), rel=1e-12)
    assert float(curve[8]) == 0.0


@torch.no_grad()
def test_measured_embedding_curve_is_the_model_output_change_at_the_probed_ranks():
    from tensorslim.layers import LowRankEmbedding

    model, batches = _Lookup(), _token_batches()
    cal = calibrate(model, batches, layers=["emb", "out"], error="measured", sensitivity_batches=3)
    assert set(cal.tokens) == {"emb"} and set(cal.stats) == {"out"}
    ranks, _ = cal.measured["emb"]
    curve = cal.error_curve("emb", model.emb.weight)
    for r in ranks.tolist():
        trial = copy.deepcopy(model)
        trial.emb = LowRankEmbedding.from_dense(model.emb, r)
        brute = 0.0
        for b in batches:
            keep = b["attention_mask"].bool()
            brute += float((trial(**b) - model(**b))[keep].square().sum())
        assert float(curve[r]) == pytest.approx(brute, rel=1e-9)
    # the relative error has no curve for a table (the planner falls back to its weight proxy)
    assert with_error(cal, model, batches, "relative").error_curve("emb", model.emb.weight) is None

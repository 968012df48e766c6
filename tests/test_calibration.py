"""Calibration statistics: tensor, tuple and dict batches; exact sums; data-aware layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.calibration import Calibration, calibrate, collect_input_stats, fisher_row_weights
from tensorslim.layers import LowRankLinear


class _Two(nn.Module):
    """Two Linears; takes (x, gate) positionally or as keywords; x (B, L, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x, gate=None):
        h = torch.relu(self.a(x))
        return self.b(h if gate is None else h * gate)


def _brute(x: torch.Tensor) -> torch.Tensor:
    r = x.reshape(-1, x.shape[-1]).double()
    return r.T @ r


def test_tensor_tuple_and_dict_batches_give_the_same_exact_sums():
    torch.manual_seed(0)
    m = _Two().double()
    xs = [torch.randn(3, 7, 6, dtype=torch.float64) for _ in range(3)]
    gate = torch.ones(1, dtype=torch.float64)
    as_tensor = collect_input_stats(m, xs)
    as_tuple = collect_input_stats(m, [(x, gate) for x in xs])
    as_dict = collect_input_stats(m, [{"x": x, "gate": gate} for x in xs])
    ref_a = sum(_brute(x) for x in xs)
    ref_b = sum(_brute(torch.relu(m.a(x))) for x in xs)
    for st in (as_tensor, as_tuple, as_dict):
        assert st["a"].samples == 63
        assert torch.allclose(st["a"].gram, ref_a, atol=1e-10)
        assert torch.allclose(st["b"].gram, ref_b, atol=1e-10)
        total = sum(x.reshape(-1, 6).sum(0) for x in xs)
        assert torch.allclose(st["a"].mean, total / 63, atol=1e-12)
        assert torch.allclose(st["a"].abs_mean, sum(x.abs().reshape(-1, 6).sum(0) for x in xs) / 63)


def test_attention_mask_drops_padded_positions():
    torch.manual_seed(1)
    m = _Two().double()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = m

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids)

    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    st = collect_input_stats(Wrap(), [{"input_ids": x, "attention_mask": mask}])
    kept = x[mask.bool()]
    assert st["inner.a"].samples == 8
    assert torch.allclose(st["inner.a"].gram, kept.T @ kept, atol=1e-12)
    # centred metric: sum (x - mean)(x - mean)^T
    c = kept - kept.mean(0)
    assert torch.allclose(st["inner.a"].centered_gram, c.T @ c, atol=1e-10)


def test_bad_inputs_are_refused():
    m = _Two()
    with pytest.raises(TypeError, match="calibration batches must be"):
        collect_input_stats(m, [3.0])
    with pytest.raises(TypeError, match="wrap it in a list"):
        collect_input_stats(m, torch.randn(2, 6))
    with pytest.raises(ValueError, match="no batches"):
        collect_input_stats(m, [])
    with pytest.raises(ValueError, match="not nn.Linear"):
        collect_input_stats(m, [torch.randn(2, 6)], layers=["c"])
    with pytest.raises(ValueError, match="unknown variant"):
        Calibration({}, "fisher")


@torch.no_grad()
def test_data_aware_layer_is_the_output_optimum_with_bias_absorbed():
    """from_dense(gram=, input_mean=) gives the least centred output error of its rank, and
    the error's mean goes into the bias: no rank-r layer with any bias does better."""
    torch.manual_seed(2)
    lin = nn.Linear(12, 10).double()
    x = (torch.randn(500, 12, dtype=torch.float64) * torch.logspace(0, 1.5, 12)) + 3.0
    st = collect_input_stats(nn.Sequential(lin), [x])["0"]
    layer = LowRankLinear.from_dense(lin, 4, gram=st.gram / st.samples, input_mean=st.mean)
    plain = LowRankLinear.from_dense(lin, 4)
    y = lin(x)
    err = float((layer(x) - y).square().sum())
    assert err < float((plain(x) - y).square().sum())
    # brute-force reference: reduced-rank regression of the centred outputs on centred inputs
    xc, yc = x - x.mean(0), y - y.mean(0)
    b = torch.linalg.lstsq(xc, yc).solution
    vecs = torch.linalg.eigh((xc @ b).T @ (xc @ b)).eigenvectors[:, -4:]
    ref = float(((xc @ b @ vecs @ vecs.T) - yc).square().sum())
    assert abs(err - ref) < 1e-8 * float(y.square().sum())
    assert abs(layer.output_error ** 2 - err / float(yc.square().sum())) < 1e-10


@torch.no_grad()
def test_compress_with_calibration_and_asvd_variant():
    torch.manual_seed(3)
    m = _Two().double().eval()
    xs = [torch.randn(4, 3, 6, dtype=torch.float64) * torch.logspace(0, 2, 6) for _ in range(4)]
    plan = ts.make_plan(m, "svd", xs[0], ranks=2)
    errs = {}
    for name, cal in [("plain", None), ("whiten", xs), ("asvd", calibrate(m, xs, variant="asvd"))]:
        c = ts.compress(copy.deepcopy(m), plan, calibration=cal, progress=False)
        errs[name] = sum(float((c(x) - m(x)).square().sum()) for x in xs)
    assert errs["whiten"] < errs["plain"]
    assert errs["whiten"] < errs["asvd"]


def test_fwsvd_variant_weights_rows_by_probed_output_gradients():
    from tensorslim.sensitivity import probe_loss
    from tensorslim.tensor import row_weighted_svd

    torch.manual_seed(5)
    m = _Two().double().eval()
    xs = [torch.randn(4, 3, 6, dtype=torch.float64) * torch.logspace(0, 2, 6) for _ in range(4)]
    cal = calibrate(m, xs, variant="fwsvd", error="relative", sequential="off")
    # the row weights: FWSVD's gradient norms of a Gaussian probe of the outputs (seed 0)
    ref = fisher_row_weights(m, xs, probe_loss(None))
    assert set(cal.row_weights) == {"a", "b"}
    for n in ("a", "b"):
        assert torch.allclose(cal.row_weights[n], ref[n], rtol=1e-10)
        assert float(cal.row_weights[n].min()) > 0
    assert m.a.weight.grad is None
    plan = ts.make_plan(m, "svd", xs[0], ranks=2)
    built = {}
    for name, c in [("plain", None), ("whiten", calibrate(m, xs, error="relative", sequential="off")), ("fwsvd", cal)]:
        built[name] = ts.compress(copy.deepcopy(m), plan, calibration=c, progress=False)
    d, w = cal.row_weights["a"], m.a.weight.detach()
    lay = built["fwsvd"].a
    approx = (lay.project_out.weight @ lay.project_in.weight).detach()
    assert torch.allclose(approx, row_weighted_svd(w, d, 2).to_tensor(), atol=1e-10)
    # FWSVD is the optimum of the row-weighted weight error: no lower for plain or whitened SVD
    mine = float((d[:, None] * (w - approx)).norm())
    for other in ("plain", "whiten"):
        o = built[other].a
        assert mine <= float((d[:, None] * (w - o.project_out.weight.detach() @ o.project_in.weight.detach())).norm()) \
            + 1e-12
    # its rank allocation prices the FWSVD fit: the curve at the plan's rank is the fit's output error
    curve = cal.error_curve("a", m.a.weight)
    assert abs(float(curve[2]) - lay.output_error ** 2) < 1e-10
    # fitted sequentially the row weights still apply (a differs from whitening on the same inputs)
    seq = ts.compress(copy.deepcopy(m), plan, calibration=calibrate(m, xs, variant="fwsvd", sequential="inputs",
                                                                     error="relative"), progress=False)
    white = ts.compress(copy.deepcopy(m), plan, calibration=calibrate(m, xs, sequential="inputs", error="relative"),
                        progress=False)
    assert not torch.allclose(seq.b.project_in.weight, white.b.project_in.weight, atol=1e-6)
    # the FWSVD layer refuses mixed or data-free options
    with pytest.raises(TypeError, match="not both"):
        LowRankLinear.from_linear_data(m.a, 2, torch.eye(6, dtype=torch.float64), scale=torch.ones(6),
                                       row_weights=torch.ones(5))
    with pytest.raises(TypeError, match="need gram"):
        LowRankLinear.from_dense(m.a, 2, row_weights=torch.ones(5))


def test_fisher_row_weights_are_gradient_norms():
    torch.manual_seed(4)
    m = _Two().double()
    xs = [torch.randn(3, 6, dtype=torch.float64) for _ in range(2)]
    w = fisher_row_weights(m, xs, lambda out, _b: out.square().sum())
    assert m.b.weight.grad is None  # gradients cleared
    ref = torch.zeros(4, dtype=torch.float64)
    for x in xs:
        m.zero_grad()
        m(x).square().sum().backward()
        ref += m.b.weight.grad.square().sum(1)
    assert torch.allclose(w["b"], ref.sqrt(), atol=1e-10)


class _MaskedTwo(_Two):
    """_Two called with a tokenizer-like dict: ``x`` (B, L, 6) and an ``attention_mask`` (B, L)."""

    def forward(self, x, attention_mask=None):
        return super().forward(x)


def _padded(seed: int, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.zeros(4, 9, dtype=torch.long)
        for i, length in enumerate(torch.randint(1, 10, (4,), generator=g).tolist()):
            mask[i, :length] = 1
        out.append({"x": torch.randn(4, 9, 6, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 6),
                    "attention_mask": mask})
    return out


def test_sequence_weighting_counts_every_text_once():
    from tensorslim.batches import weighted_rows

    m = _MaskedTwo().double()
    batches = _padded(7)
    st = collect_input_stats(m, batches, weighting="sequence")["a"]
    gram, total, seqs, rows = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0, 0
    for b in batches:
        for x, mk in zip(b["x"], b["attention_mask"].bool()):
            r = x[mk]
            gram += r.T @ r / r.shape[0]
            total += r.sum(0) / r.shape[0]
            seqs, rows = seqs + 1, rows + r.shape[0]
    assert torch.allclose(st.gram, gram, atol=1e-10) and torch.allclose(st.total, total, atol=1e-10)
    assert abs(st.samples - seqs) < 1e-12 and st.rows == rows
    tok = collect_input_stats(m, batches)["a"]
    assert tok.samples == rows == tok.rows
    # a 2-D input (no sequence axis) keeps weight 1 per row
    assert torch.equal(weighted_rows(torch.ones(5, 3), None, "sequence")[1], torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown weighting 'words'"):
        collect_input_stats(m, batches, weighting="words")
    with pytest.raises(ValueError, match="unknown weighting"):
        calibrate(m, batches, weighting="words")


@torch.no_grad()
def test_sequence_weighting_reaches_the_fits():
    torch.manual_seed(8)
    m = _MaskedTwo().double().eval()
    batches = _padded(9, n=4)
    plan = ts.make_plan(m, "svd", (batches[0]["x"],), ranks=2)
    for seq in ("off", "inputs", "outputs"):
        cal = calibrate(m, batches, weighting="sequence", sequential=seq, error="relative")
        assert cal.weighting == "sequence"
        got = ts.compress(copy.deepcopy(m), plan, calibration=cal, progress=False).a
        # layer a sees the dense inputs in every mode: its fit is the weighted whitened SVD
        st = collect_input_stats(m, batches, layers=["a"], weighting="sequence")["a"]
        want = LowRankLinear.from_dense(m.a, 2, gram=st.gram / st.samples, input_mean=st.mean)
        if seq != "outputs":  # the outputs fit also pulls towards the dense weight (damping)
            assert torch.allclose(got.project_out.weight @ got.project_in.weight,
                                  want.project_out.weight @ want.project_in.weight, atol=1e-9), seq
            assert torch.allclose(got.project_out.bias, want.project_out.bias, atol=1e-9), seq
        token = ts.compress(copy.deepcopy(m), plan, calibration=calibrate(m, batches, sequential=seq,
                                                                           error="relative"), progress=False).a
        assert not torch.allclose(got.project_in.weight, token.project_in.weight, atol=1e-6), seq

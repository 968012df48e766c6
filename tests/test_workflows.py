"""workflows: interleaved latency rows (what demo / compress print)."""
import math
import statistics

import pytest
import torch
from torch import nn

from tensorslim.report import ModelSummary
from tensorslim.workflows import LATENCY_ROUNDS, side_by_side_latency, with_side_by_side_latency


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).eval()


def test_side_by_side_latency_times_every_model_every_round(monkeypatch):
    import tensorslim.cost as cost

    calls = []
    real = cost.measure_latency

    def spy(model, x, **kw):
        calls.append(model)
        return real(model, x, **kw)

    monkeypatch.setattr(cost, "measure_latency", spy)
    a, b = _mlp(256), _mlp(8)
    lat = side_by_side_latency([a, b], torch.randn(4, 1, 8, 8), threads=1, repeats=2)
    assert len(lat) == 2 and all(math.isfinite(t) and t > 0 for t in lat)
    assert calls == [a, b] * LATENCY_ROUNDS  # interleaved: a, b, a, b, ...
    with pytest.raises(ValueError, match="2 inputs for 3 models"):
        side_by_side_latency([a, b, a], [torch.randn(4, 1, 8, 8)] * 2, threads=1)


def _spy_latency(monkeypatch) -> list[tuple[int, tuple[int, ...], bool, float]]:
    """Record (params of the model, input shape, channels_last input, median ms) per call."""
    import tensorslim.cost as cost

    calls, real = [], cost.measure_latency

    def spy(model, x, **kw):
        lat = real(model, x, **kw)
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        calls.append((sum(p.numel() for p in model.parameters()), tuple(x.shape), cl, lat.median_ms))
        return lat

    monkeypatch.setattr(cost, "measure_latency", spy)
    return calls


def test_conv_rows_take_the_faster_layout_of_each_model_without_touching_them(monkeypatch):
    from tensorslim.report import summary_table

    calls = _spy_latency(monkeypatch)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    comp = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 4, 3)).eval()
    rows = [ModelSummary("dense", None, 1, 10, None), ModelSummary("comp", None, 1, 2, None)]
    out = with_side_by_side_latency(rows, dense, comp, torch.randn(2, 3, 16, 16), threads=1)
    # every call timed the given batch; each model in both layouts, interleaved, every round
    n_dense, n_comp = (sum(p.numel() for p in m.parameters()) for m in (dense, comp))
    assert len(calls) == 4 * LATENCY_ROUNDS and {c[1] for c in calls} == {(2, 3, 16, 16)}
    assert [(c[0], c[2]) for c in calls[:4]] == [(n_dense, False), (n_comp, False), (n_dense, True),
                                                 (n_comp, True)]
    med = [statistics.median(c[3] for c in calls[i::4]) for i in range(4)]
    d, c = out[0].latency_ms, out[1].latency_ms
    assert all(math.isfinite(t) and t > 0 for t in (d, c))
    assert (d, c) == (min(med[0], med[2]), min(med[1], med[3]))  # each model's faster layout
    assert f"{d:.2f}" in summary_table(out) and f"{d / c:.2f}x" in summary_table(out).splitlines()[2]
    # the models themselves stay NCHW (timing ran on channels_last copies)
    assert all(p.is_contiguous() for m in (dense, comp) for p in m.parameters())


def test_rows_of_one_architecture_share_one_measurement(monkeypatch):
    calls = _spy_latency(monkeypatch)
    dense, comp = _mlp(256), _mlp(8)
    rows = [ModelSummary("dense", 0.9, 1, 10, None), ModelSummary("comp", 0.5, 1, 2, None),
            ModelSummary("comp + FT", 0.8, 1, 2, None)]
    out = with_side_by_side_latency(rows, dense, comp, torch.randn(4, 1, 8, 8), threads=1)
    assert [r.label for r in out] == ["dense", "comp", "comp + FT"]
    assert [r.accuracy for r in out] == [0.9, 0.5, 0.8]
    assert all(math.isfinite(r.latency_ms) and r.latency_ms > 0 for r in out)
    assert out[1].latency_ms == out[2].latency_ms
    # one interleaved measurement (dense, comp, then their channels_last copies, each round):
    # each model's row is its faster layout's median over rounds, batch 4 throughout
    med = [statistics.median(c[3] for c in calls[i::4]) for i in range(4)]
    assert len(calls) == 4 * LATENCY_ROUNDS and {c[1] for c in calls} == {(4, 1, 8, 8)}
    assert [out[0].latency_ms, out[1].latency_ms] == [min(med[0], med[2]), min(med[1], med[3])]


def test_evaluate_reports_a_latency_plans_prediction_next_to_the_measured_time(tmp_path):
    # a checkpoint whose plan carries a latency record (as make_plan(target_latency=...)
    # writes it): evaluate times the fused model as the plan did and reports both
    import dataclasses

    import tensorslim as ts
    from tensorslim.workflows import EvaluateConfig, Source, run_evaluate

    model = ts.models.create("vgg16", width=0.125).eval()
    x = torch.randn(1, 1, 28, 28)
    plan = ts.make_plan(model, "tucker", x, target_macs=0.5)
    record = {"batch": 3, "layout": "channels_last", "threads": 1, "dense_ms": 2.5, "predicted_ms": 1.25}
    plan = dataclasses.replace(plan, goal={**plan.goal, "latency": record})
    import copy

    ts.save(ts.compress(copy.deepcopy(model), plan, progress=False), plan, tmp_path / "c")
    res = run_evaluate(EvaluateConfig(Source(checkpoint=str(tmp_path / "c")), latency_batch=2,
                                      threads=1, accuracy=False))
    lat = res["plan_latency"]
    assert {k: lat[k] for k in record} == record
    assert math.isfinite(lat["measured_ms"]) and lat["measured_ms"] > 0
    # a source without a latency plan has none
    ts.save(model, ts.CompressionPlan(layers=(), method="keep"), tmp_path / "d")
    assert run_evaluate(EvaluateConfig(Source(checkpoint=str(tmp_path / "d")), latency_batch=2,
                                       threads=1, accuracy=False))["plan_latency"] is None

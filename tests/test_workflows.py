"""workflows: interleaved latency rows (what demo / compress print)."""
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
    assert len(lat) == 2 and all(t > 0 for t in lat)
    assert calls == [a, b] * LATENCY_ROUNDS  # interleaved: a, b, a, b, ...
    with pytest.raises(ValueError, match="2 inputs for 3 models"):
        side_by_side_latency([a, b, a], [torch.randn(4, 1, 8, 8)] * 2, threads=1)


def test_conv_rows_take_the_faster_layout_of_each_model_without_touching_them():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    comp = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 4, 3)).eval()
    rows = [ModelSummary("dense", None, 1, 10, None), ModelSummary("comp", None, 1, 2, None)]
    out = with_side_by_side_latency(rows, dense, comp, torch.randn(2, 3, 16, 16), threads=1)
    assert out[0].latency_ms > 0 and out[1].latency_ms > 0
    # the models themselves stay NCHW (timing ran on channels_last copies)
    assert all(p.is_contiguous() for m in (dense, comp) for p in m.parameters())


def test_rows_of_one_architecture_share_one_measurement():
    dense, comp = _mlp(256), _mlp(8)
    rows = [ModelSummary("dense", 0.9, 1, 10, None), ModelSummary("comp", 0.5, 1, 2, None),
            ModelSummary("comp + FT", 0.8, 1, 2, None)]
    out = with_side_by_side_latency(rows, dense, comp, torch.randn(4, 1, 8, 8), threads=1)
    assert [r.label for r in out] == ["dense", "comp", "comp + FT"]
    assert [r.accuracy for r in out] == [0.9, 0.5, 0.8]
    assert out[0].latency_ms > 0 and out[1].latency_ms > 0
    assert out[1].latency_ms == out[2].latency_ms

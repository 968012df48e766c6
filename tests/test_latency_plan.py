"""Latency-aware planning (issue 16 item 2): ``make_plan(..., target_latency=...)`` chooses
ranks by measured time. Every test but the last uses a deterministic stub timer."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.plan import CompressionPlan
from tensorslim.planning import InterleavedTimer, collect_layers, latency, latency_cache, timing_ranks
from tensorslim.planning.latency import FRACTIONS
from tensorslim.planning.latency_measure import batched_inputs, batched_shape

MODEL_MS, DENSE_MS = 10.0, {"0": 2.0, "2": 6.0}  # so the fixed rest is 10 - 2 - 6 = 2 ms


class StubTimer:
    """Whole model: MODEL_MS. Dense layer: DENSE_MS per call. A factorized candidate: its dense
    time times its MAC fraction, or times ``slow`` for the layers in ``slow_layers``. A
    compressed model (``method == "plan"``): the dense model with those times swapped in, the
    factorized ones times ``inflate`` (a model in which layers run slower than alone)."""

    name = "stub"

    def __init__(self, slow_layers=("0",), slow=1.5, model_ms=MODEL_MS, dense=DENSE_MS, inflate=1.0, calls=None):
        self.slow_layers, self.slow, self.model_ms, self.dense = set(slow_layers), slow, model_ms, dense
        self.inflate, self.per_forward = inflate, calls or {}
        self.calls = 0

    def __call__(self, jobs):
        self.calls += 1
        out, dense_macs = [], None
        for j in jobs:
            if j.method == "plan":
                out.append(self._plan_ms(j, jobs[0]))
            elif j.layer == "":
                out.append(self.model_ms)
            elif j.method == "dense":
                dense_macs = ts.count(j.module, j.inputs).total_macs
                out.append(self.dense[j.layer])
            else:
                factor = self.slow if j.layer in self.slow_layers else ts.count(j.module, j.inputs).total_macs / dense_macs
                out.append(self.dense[j.layer] * factor)
        return out

    def _plan_ms(self, job, dense_job):
        dense = {lc.name: lc.macs for lc in ts.count(dense_job.module, dense_job.inputs).layers}
        comp = {lc.name: lc.macs for lc in ts.count(job.module, job.inputs).layers}
        ms = self.model_ms
        for name in job.rank:
            per_forward = self.dense[name] * self.per_forward.get(name, 1)
            factor = self.slow if name in self.slow_layers else comp[name] / dense[name]
            ms += per_forward * factor * self.inflate - per_forward
        return ms


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()


X = torch.randn(1, 8, 8, 8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORSLIM_CACHE_DIR", str(tmp_path / "latency"))
    monkeypatch.setattr(latency, "channel_block", lambda: 8)


def _timed_ranks(model, name):
    layer = next(l for l in collect_layers(model, "tucker", ts.count(model, X))[0] if l.name == name)
    return [(r, macs / layer.macs) for r, macs in timing_ranks(layer)]


@pytest.mark.parametrize("rule", ["min_error", "uniform"])
def test_budget_met_as_computed_by_hand_and_slow_layer_kept_dense(rule):
    model, timer = _model(), StubTimer()
    plan = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer, rank_rule=rule)
    # by hand: budget 0.5 * 10 = 5 ms = rest 2 + layer "0" dense 2 + layer "2" <= 1 ms, i.e. the
    # timed rank of "2" with the most MACs whose time 6 ms * MAC fraction is <= 1 ms
    cands = _timed_ranks(model, "2")
    rank, frac = max(((r, f) for r, f in cands if 6.0 * f <= 1.0), key=lambda rf: rf[1])
    assert plan["2"].method == "tucker" and plan["2"].rank == rank
    assert plan["0"].method == "keep"
    assert plan["0"].reason == "kept dense: every factorized rank is slower at batch 1 (best 1.50x dense time)"
    lat = plan.goal["latency"]
    assert plan.goal["objective"] == "latency" and plan.goal["target_latency"] == 0.5
    assert lat["dense_ms"] == MODEL_MS and lat["rest_ms"] == pytest.approx(2.0)
    assert lat["predicted_ms"] == pytest.approx(2.0 + 2.0 + 6.0 * frac, abs=1e-4)
    assert lat["predicted_ms"] <= 5.0 + 1e-9
    assert lat["layers"]["0"] == {"dense_ms": 2.0, "ms": 2.0,
                                  "measured": tuple((r, 3.0) for r, _ in _timed_ranks(model, "0"))}
    assert lat["layers"]["2"]["dense_ms"] == 6.0 and lat["layers"]["2"]["ms"] == pytest.approx(6.0 * frac, abs=1e-4)
    assert (lat["batch"], lat["layout"], lat["threads"]) == (1, "channels_last", torch.get_num_threads())
    assert timer.calls == 3  # a table per layer with candidates (the model timed in each), one check
    assert lat["measured_ratio"] == pytest.approx(lat["predicted_ratio"], abs=1e-4) and lat["correction"] == 1.0


def test_timed_ranks_are_bounded_and_prefer_the_channel_block():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).eval()
    layer = collect_layers(model, "tucker", ts.count(model, torch.randn(1, 64, 8, 8)))[0][0]
    ranks = timing_ranks(layer)
    assert 4 <= len(ranks) <= len(FRACTIONS)
    assert all(r[0] % 8 == 0 and r[1] % 8 == 0 for r, _ in ranks)  # (r_in, r_out) multiples of 8
    fracs = [m / layer.macs for _, m in ranks]
    assert fracs == sorted(fracs) and max(fracs) < 1


def test_second_plan_reads_the_cache_and_a_changed_key_measures_again(monkeypatch):
    model, timer = _model(), StubTimer()
    first = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    assert timer.calls == 3
    again = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    assert timer.calls == 3  # nothing timed: every entry was cached
    assert again == first
    monkeypatch.setattr(latency_cache, "cpu_model", lambda: "Another CPU")
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    assert timer.calls == 6
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    assert timer.calls == 9
    old = torch.get_num_threads()
    torch.set_num_threads(old + 1)
    try:
        ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    finally:
        torch.set_num_threads(old)
    assert timer.calls == 12
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)  # the changed CPU again
    assert timer.calls == 12


def test_a_cache_file_recording_another_key_is_not_used():
    model, timer = _model(), StubTimer()
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    [path] = list(latency_cache.cache_dir().glob("latency-*.json"))
    data = json.loads(path.read_text())
    assert data["key"]["device"] == latency_cache.cpu_model() and data["key"]["timer"] == "stub"
    assert data["entries"]["Conv2d(32, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))|in=[1, 32, 8, 8]|"
                           "strides=[2048, 1, 256, 32]|channels_last|torch.float32|dense|null|"] == 6.0
    data["key"]["threads"] = -1  # e.g. a stale or hand-edited file under this name
    path.write_text(json.dumps(data))
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    assert timer.calls == 6


def test_batch_and_layout_are_part_of_the_entry():
    model, timer = _model(), StubTimer()
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    plan = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer, latency_batch=4)
    assert timer.calls == 6 and plan.goal["latency"]["batch"] == 4
    plan = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer, layout="nchw")
    assert timer.calls == 9 and plan.goal["latency"]["layout"] == "nchw"
    ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer, latency_cache=False)
    assert timer.calls == 12


def test_plan_json_round_trip_keeps_the_latency_record(tmp_path):
    plan = ts.make_plan(_model(), "tucker", X, target_latency=0.5, latency_timer=StubTimer())
    back = CompressionPlan.from_json(plan.to_json())
    assert back.goal["latency"] == plan.goal["latency"]
    assert back.layers == plan.layers
    plan.save(tmp_path / "plan.json")
    assert CompressionPlan.load(tmp_path / "plan.json").goal["latency"]["predicted_ms"] == \
        plan.goal["latency"]["predicted_ms"]


def test_unreachable_target_plans_the_fastest_choice_and_says_the_best_ratio():
    model = _model()
    with pytest.warns(RuntimeWarning, match=r"target_latency=0.1 is unreachable at batch 1 .*"
                                            r"best reachable target_latency=0\.4\d\d"):
        plan = ts.make_plan(model, "tucker", X, target_latency=0.1, latency_timer=StubTimer())
    lat = plan.goal["latency"]
    fastest = min(f for _, f in _timed_ranks(model, "2"))
    assert lat["best_ratio"] == pytest.approx((2 + 2 + 6 * fastest) / 10, abs=1e-4)
    assert lat["predicted_ratio"] == lat["best_ratio"] and "best reachable" in lat["note"]
    assert plan["2"].rank == min(_timed_ranks(model, "2"), key=lambda rf: rf[1])[0]


def test_never_slower_than_dense_when_every_layer_is_slower():
    with pytest.warns(RuntimeWarning, match=r"best reachable target_latency=1\.000"):
        plan = ts.make_plan(_model(), "tucker", X, target_latency=0.9, latency_timer=StubTimer(("0", "2")))
    assert not plan.compressed
    assert all("every factorized rank is slower" in s.reason for s in plan.layers)
    assert plan.goal["latency"]["predicted_ms"] == MODEL_MS and plan.goal["latency"]["best_ratio"] == 1.0


def test_a_reachable_target_neither_warns_nor_notes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = ts.make_plan(_model(), "tucker", X, target_latency=0.9, latency_timer=StubTimer())
    assert "note" not in plan.goal["latency"] and plan.goal["latency"]["predicted_ratio"] <= 0.9


@pytest.mark.parametrize("goal,msg", [
    ({"target_latency": 0}, r"target_latency must be a number in \(0, 1\], got 0"),
    ({"target_latency": 1.5}, r"target_latency must be a number in \(0, 1\], got 1.5"),
    ({"target_latency": float("nan")}, r"target_latency must be a number in \(0, 1\]"),
    ({"target_latency": 0.5, "layout": "nhwc"}, r"layout must be one of channels_last, nchw, got 'nhwc'"),
    ({"target_latency": 0.5, "latency_batch": 0}, r"latency_batch must be an int >= 1 .*got 0"),
    ({"target_latency": 0.5, "latency_batch": 2.0}, r"latency_batch must be an int >= 1 .*got 2.0"),
    ({"target_latency": 0.5, "latency_cache": "yes"}, r"latency_cache must be True or False"),
    ({"target_macs": 0.5, "latency_batch": 4},
     r"latency_batch=, latency_timer= only take effect with target_latency= \(a latency goal\)"),
    ({"target_macs": 0.5, "target_latency": 0.5}, r"exactly one of"),
    ({"target_latency": 0.5, "rank_rule": "vbmf"}, r"rank_rule='vbmf' needs no goal"),
])
def test_bad_latency_arguments_are_one_line_value_errors(goal, msg):
    with pytest.raises(ValueError, match=msg) as e:
        ts.make_plan(_model(), "tucker", X, latency_timer=StubTimer(), **goal)
    assert "\n" not in str(e.value)


def test_a_timer_returning_garbage_is_named():
    with pytest.raises(ValueError, match=r"latency_timer .*must return one finite time in ms > 0 per job"):
        ts.make_plan(_model(), "tucker", X, target_latency=0.5, latency_timer=lambda jobs: [1.0])


def test_batched_shapes_and_inputs():
    assert batched_shape((2, 8, 4, 4), 2, 64) == (64, 8, 4, 4)
    assert batched_shape((6, 32), 2, 5) == (15, 32)  # batch x time folded: scaled
    assert batched_shape((7, 32), 2, 5) == (7, 32)  # not a multiple of the batch: kept
    x = torch.arange(3.0).reshape(3, 1)
    (y, flag) = batched_inputs((x, 1.5), 7)
    assert y[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0] and flag == 1.5


@pytest.mark.filterwarnings("ignore:target_latency=.*unreachable")
def test_real_timer_smoke(monkeypatch):
    """The default timer on a tiny model, one round: a well-formed, consistent record (no
    assertion on the clock's values); on glibc's malloc the plan warns that its predictions
    for factorized layers are optimistic."""
    import tensorslim.runtime

    model = _model()
    monkeypatch.setattr(tensorslim.runtime, "allocator", lambda *a: "system")
    with pytest.warns(RuntimeWarning, match="latency plan timed on the system allocator: .*TCMalloc"):
        plan = ts.make_plan(model, "tucker", X, target_latency=0.9, latency_cache=False,
                            latency_timer=InterleavedTimer(rounds=1, warmup=0))
    assert plan.goal["latency"]["allocator"] == "system"
    lat = plan.goal["latency"]
    assert lat["dense_ms"] > 0 and math.isfinite(lat["predicted_ms"])
    assert lat["predicted_ms"] <= lat["dense_ms"] + 1e-9
    assert set(lat["layers"]) == {"0", "2"}
    chosen = sum(lat["layers"][n]["ms"] for n in lat["layers"])
    assert lat["predicted_ms"] == pytest.approx(lat["rest_ms"] + chosen, abs=1e-3)
    out = ts.compress(model, plan, progress=False)(X)
    assert out.shape == (1, 32, 8, 8)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        InterleavedTimer(rounds=0)
    with pytest.raises(ValueError, match="clock must be one of auto, cpu, wall"):
        InterleavedTimer(clock="gpu")


def test_only_ranks_clearly_faster_and_not_dominated_are_candidates():
    from tensorslim.planning import LayerTimes

    t = LayerTimes(10.0, (
        (4, 5.0, 100),   # dominated: rank 8 has more MACs at 5.1 ms (within 3 %)
        (8, 5.1, 200),
        (12, 8.0, 300),
        (16, 7.5, 400),  # faster AND more MACs than rank 12: 12 is dominated
        (20, 9.2, 500),  # only 8 % faster than dense: not worth it
    ))
    assert t.faster() == [(8, 5.1), (16, 7.5)]
    assert LayerTimes(10.0, ((4, 9.6, 1),)).faster() == []


def test_a_rank_barely_faster_than_dense_keeps_the_layer_dense():
    with pytest.warns(RuntimeWarning, match="unreachable"):
        plan = ts.make_plan(_model(), "tucker", X, target_latency=0.9,
                            latency_timer=StubTimer(("0", "2"), slow=0.97))
    assert not plan.compressed
    assert plan["2"].reason == "kept dense: no factorized rank is 10% faster at batch 1 (best 0.97x dense time)"
    assert plan.goal["latency"]["best_ratio"] == 1.0


class DriftingTimer(StubTimer):
    """The machine gets slower from one table to the next (all of a table's jobs alike)."""

    def __call__(self, jobs):
        return [t * (1 + self.calls) for t in super().__call__(jobs)]  # calls already counted


def test_tables_timed_at_different_speeds_are_put_on_one_scale(tmp_path, monkeypatch):
    steady = ts.make_plan(_model(), "tucker", X, target_latency=0.5, latency_timer=StubTimer())
    monkeypatch.setenv("TENSORSLIM_CACHE_DIR", str(tmp_path / "drift"))
    drift = ts.make_plan(_model(), "tucker", X, target_latency=0.5, latency_timer=DriftingTimer())
    # tables at 2x and 3x speed: the model's median 25 ms, each table rescaled to it
    lat = drift.goal["latency"]
    assert lat["dense_ms"] == 25.0 and lat["rest_ms"] == pytest.approx(5.0)
    assert lat["layers"]["0"]["dense_ms"] == pytest.approx(5.0)
    assert lat["layers"]["2"]["dense_ms"] == pytest.approx(15.0)
    assert [s.rank for s in drift.layers] == [s.rank for s in steady.layers]
    assert lat["predicted_ratio"] == steady.goal["latency"]["predicted_ratio"]


def test_layers_alike_are_timed_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    timer = StubTimer(slow_layers=(), dense={"0": 6.0, "2": 6.0}, model_ms=14.0)
    plan = ts.make_plan(model, "tucker", torch.randn(1, 32, 8, 8), target_latency=0.5, latency_timer=timer)
    assert timer.calls == 2  # same geometry, input shape and strides: one table serves both; one check
    lat = plan.goal["latency"]
    assert lat["layers"]["0"] == lat["layers"]["2"] and lat["rest_ms"] == pytest.approx(2.0)
    assert lat["predicted_ms"] <= 7.0 + 1e-9


class FixedBatch(nn.Module):
    """Works only at batch 1 (a hard-coded reshape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(1, 32 * 8 * 8)


def test_a_model_that_fails_at_the_latency_batch_is_named():
    with pytest.raises(ValueError, match=r"latency_batch=4: the fused model fails on the example inputs repeated "
                                         r"to 4 rows \(RuntimeError: .*\); give example inputs with that batch"):
        ts.make_plan(FixedBatch().eval(), "tucker", X, target_latency=0.5, latency_batch=4,
                     latency_timer=StubTimer(dense={"conv": 1.0}))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_a_layer_called_twice_counts_twice():
    timer = StubTimer(slow_layers=(), dense={"conv": 3.0}, model_ms=8.0, calls={"conv": 2})
    plan = ts.make_plan(Twice().eval(), "tucker", torch.randn(1, 32, 8, 8), target_latency=0.5, latency_timer=timer)
    lat = plan.goal["latency"]
    assert lat["layers"]["conv"]["dense_ms"] == 6.0 and lat["rest_ms"] == pytest.approx(2.0)
    assert lat["predicted_ms"] == pytest.approx(2.0 + lat["layers"]["conv"]["ms"], abs=1e-4) and lat["predicted_ms"] <= 4.0


def test_a_model_slower_than_its_layers_predict_corrects_the_table_and_chooses_again():
    model, timer = _model(), StubTimer(inflate=2.0)  # inside the model factorized layers take 2x
    plan = ts.make_plan(model, "tucker", X, target_latency=0.5, latency_timer=timer)
    lat = plan.goal["latency"]
    # by hand: with the check's correction 2, layer "2" takes 2 * 6 ms * MAC fraction <= 1 ms
    rank, frac = max(((r, f) for r, f in _timed_ranks(model, "2") if 12.0 * f <= 1.0), key=lambda rf: rf[1])
    assert lat["correction"] == 2.0 and plan["2"].rank == rank
    assert lat["predicted_ms"] == pytest.approx(4.0 + 12.0 * frac, abs=1e-4)
    assert lat["measured_ratio"] == pytest.approx(lat["predicted_ratio"], abs=1e-4)  # the check agrees now
    assert timer.calls == 4  # two tables, the first check, the check of the corrected choice


@pytest.mark.filterwarnings("ignore:target_latency=.*unreachable")
def test_a_plan_measured_no_faster_than_dense_keeps_every_layer_dense():
    plan = ts.make_plan(_model(), "tucker", X, target_latency=0.9, latency_timer=StubTimer(inflate=50.0))
    assert not plan.compressed  # the corrected table has no faster rank left
    assert plan.goal["latency"]["measured_ratio"] == 1.0 and plan.goal["latency"]["predicted_ms"] == MODEL_MS


def test_a_choice_still_slower_after_the_corrections_falls_back_to_dense():
    from types import SimpleNamespace

    from tensorslim.planning import LatencyTable, LayerTimes
    from tensorslim.planning.latency import verified_choice

    checks = []

    def verify(chosen):
        checks.append(dict(chosen))
        return 1.5  # the compressed model always measures 1.5x the dense one

    table = LatencyTable(1, "nchw", 1, "tcmalloc", True, 10.0, {"a": LayerTimes(1.0, ((4, 0.5, 10),))},
                         verify=verify)
    rule = SimpleNamespace(choose=lambda layers, ctx: ({"a": 4}, {"a": "stubborn"}))
    ctx = dataclasses.make_dataclass("Ctx", [("latency", object)], frozen=True)(table)
    chosen, notes, ctx = verified_choice(rule, [], ctx, {"a": 4}, {"a": "stubborn"})
    assert chosen == {"a": "kept dense: the compressed model measured 1.500x the dense model's time at batch 1"}
    assert notes == {} and ctx.latency.measured_ratio == 1.0
    # corrections: (1.5 * 10 - 9) / 0.5 = 12 clamped to 10, then (15 - 9) / 5 = 1.2
    assert len(checks) == 3 and ctx.latency.correction == pytest.approx(12.0)

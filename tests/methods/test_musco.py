"""MUSCO multi-stage compression: MAC schedule, EVBMF ranks, resume, checkpoint replay, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.cost import count
from tensorslim.data import make_loaders
from tensorslim.methods import musco
from tensorslim.methods._musco_ranks import stage_goal
from tensorslim.models import create
from tensorslim.tensor import multi_mode_dot

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
TARGET = 0.35
RUN = dict(stages=3, finetune_steps_per_stage=4, target_macs=TARGET, seed=3, progress=False)


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    return create("vgg16", width=0.125).eval()


@pytest.fixture(scope="module")
def train():
    """256 real Fashion-MNIST training images, batches of 32."""
    return make_loaders(32, val_size=100, subset=256, seed=0).train


@pytest.fixture(scope="module")
def full_run(train):
    """An uninterrupted 3-stage Tucker-2 run to 0.35 of the MACs (4 KD steps per stage)."""
    return musco(_vgg(), "tucker", X, train_loader=train, **RUN)


def test_mac_target_met_within_2_percent_and_macs_never_grow(full_run):
    res = full_run
    assert res.stages_done == 3 and res.stop_reason == "MAC target reached"
    ratios = [h["macs_ratio"] for h in res.history]
    assert TARGET * 0.98 <= ratios[-1] <= TARGET
    assert all(a > b for a, b in zip([1.0] + ratios, ratios))
    # geometric schedule: each stage aims at the same factor towards the target
    goals = [h["goal_macs_ratio"] for h in res.history]
    assert goals[0] == pytest.approx(TARGET ** (1 / 3), rel=1e-12)
    assert goals[1] == pytest.approx(stage_goal(ratios[0], TARGET, 2), rel=1e-12)
    assert goals[2] == pytest.approx(TARGET, rel=1e-12)
    for goal, ratio in zip(goals, ratios):
        assert goal * 0.95 <= ratio <= goal
    c = count(res.model, X)
    assert c.total_macs == res.plan.macs_after and c.total_params == res.plan.params_after
    assert res.plan.macs_ratio == pytest.approx(ratios[-1], rel=1e-12)
    for s in res.plan.compressed:  # the final plan describes the final ranks of the dense layers
        assert s.method == "tucker" and s.layer_type == "Conv2d"
        assert tuple(res.model.get_submodule(s.name).rank) == s.rank
    assert all(h["finetune"]["steps"] == 4 for h in res.history)


def test_later_stages_recompress_factorized_layers(full_run):
    first, last = full_run.history[0]["ranks"], full_run.history[-1]["ranks"]
    again = [n for n in first if n in last and last[n] != first[n]]
    assert again  # some layers were re-compressed after the first stage
    for n in again:
        assert all(b <= a for a, b in zip(first[n], last[n]))
    assert all(0 <= full_run.history[1]["errors"][n] < 1 for n in full_run.history[1]["changed"])


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(full_run, train, tmp_path):
    state = tmp_path / "state"
    part = musco(_vgg(), "tucker", X, train_loader=train, state_dir=state, max_stages_this_call=1, **RUN)
    assert part.stages_done == 1 and "paused" in part.stop_reason
    assert json.loads((state / "state.json").read_text())["stage"] == 1
    assert (state / "stage_1" / "plan.json").is_file()
    done = musco(_vgg(), "tucker", X, train_loader=train, state_dir=state, **RUN)
    assert done.stages_done == 3 and done.plan == full_run.plan
    assert [h["ranks"] for h in done.history] == [h["ranks"] for h in full_run.history]
    a, b = done.model.state_dict(), full_run.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = musco(_vgg(), "tucker", X, train_loader=train, state_dir=state, **RUN)  # finished: no work
    assert again.stages_done == 3 and again.plan == full_run.plan
    with pytest.raises(ValueError, match=r"other settings \(seed: 3 -> 4\)"):
        musco(_vgg(), "tucker", X, train_loader=train, state_dir=state, **{**RUN, "seed": 4})
    other = _vgg()
    with torch.no_grad():
        other.features[0].weight.mul_(2)
    with pytest.raises(ValueError, match="different dense model"):
        musco(other, "tucker", X, train_loader=train, state_dir=state, **RUN)


def test_save_load_replays_the_final_model(full_run, tmp_path):
    res = full_run
    ts.save(res.model, res.plan, tmp_path / "ckpt")
    loaded = ts.load(tmp_path / "ckpt").eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))
    assert count(loaded, X).total_macs == res.plan.macs_after


def _planted(shape: tuple[int, ...], r_out: int, r_in: int, g: torch.Generator) -> torch.Tensor:
    """A kernel of Tucker ranks (r_in, r_out) plus 1% noise."""
    core = torch.randn(r_out, r_in, *shape[2:], generator=g)
    u_out = torch.linalg.qr(torch.randn(shape[0], r_out, generator=g)).Q
    u_in = torch.linalg.qr(torch.randn(shape[1], r_in, generator=g)).Q
    w = multi_mode_dot(core, [u_out, u_in], [0, 1])
    return w / w.norm() * (shape[0] * shape[1]) ** 0.5 * 0.1 + 0.01 * torch.randn(shape, generator=g)


def _planted_net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 40), nn.ReLU(),
                        nn.Linear(40, 10))
    with torch.no_grad():
        net[0].weight.copy_(_planted((32, 16, 3, 3), 7, 5, g))
        net[2].weight.copy_(_planted((48, 32, 3, 3), 9, 6, g))
        low = torch.randn(40, 6, generator=g) @ torch.randn(6, 48, generator=g)
        net[6].weight.copy_(low / low.norm() * 2 + 0.01 * torch.randn(40, 48, generator=g))
    return net.eval()


def test_vbmf_rule_finds_planted_ranks_then_stops_when_ranks_stabilise(tmp_path):
    x = torch.randn(1, 16, 8, 8)
    res = musco(_planted_net(), "auto", x, stages=5, vbmf_factor=1.0, state_dir=tmp_path, progress=False)
    first = res.history[0]["ranks"]
    assert first["0"] == [5, 7] and first["2"] == [6, 9] and first["6"] == 6
    assert res.stages_done < 5 and "ranks stabilised" in res.stop_reason
    for a, b in zip(res.history, res.history[1:]):
        assert b["macs"] <= a["macs"] and all(
            torch.tensor(b["ranks"][n]).le(torch.tensor(r)).all() for n, r in a["ranks"].items())
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["done"] and state["stage"] == res.stages_done
    # a softer factor moves part of the way: R - 0.5 (R - R_vbmf), floored
    soft = musco(_planted_net(), "tucker", x, stages=1, vbmf_factor=0.5, progress=False)
    assert soft.plan["0"].rank == (10, 19)  # floor(16 - 0.5 * 11), floor(32 - 0.5 * 25)


def test_fraction_schedule_shrinks_each_rank_per_stage():
    net = _planted_net()
    x = torch.randn(1, 16, 8, 8)
    res = musco(net, "tucker", x, stages=2, stage_ranks=[0.5, 0.5], progress=False)
    assert res.history[0]["ranks"]["2"] == [16, 24]  # half of (32, 48)
    assert res.history[1]["ranks"]["2"] == [8, 12]
    assert res.plan["2"].rank == (8, 12) and res.model[2].rank == (8, 12)


def test_bad_arguments_are_clear_errors(train):
    net, x = _planted_net(), torch.randn(1, 16, 8, 8)
    with pytest.raises(ValueError, match="unknown method 'tt'; multi-stage methods: tucker, svd, cp, auto"):
        musco(net, "tt", x)
    with pytest.raises(ValueError, match="rank_rule must be 'vbmf', a fraction"):
        musco(net, "tucker", x, rank_rule="energy")
    with pytest.raises(ValueError, match="rank_rule must be 'vbmf', a fraction"):
        musco(net, "tucker", x, rank_rule=[0.5, 1.5])
    with pytest.raises(ValueError, match="needs a train_loader"):
        musco(net, "tucker", x, finetune_steps_per_stage=3)
    with pytest.raises(ValueError, match="target_macs must be a number in \\(0, 1\\]"):
        musco(net, "tucker", x, target_macs=2.0)
    with pytest.raises(ValueError, match="target_macs=0.001 is unreachable"):
        musco(net, "tucker", x, target_macs=0.001)


def test_cli_compress_multi_stage_end_to_end(tmp_path, capsys):
    from tensorslim.cli import main

    src = tmp_path / "dense"
    ts.save(_vgg(), ts.CompressionPlan(layers=(), method="keep"), src)
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(src), "--method", "tucker", "--multi-stage",
                 "--stages", "2", "--target-macs", "0.5", "--finetune-steps", "2", "--batch-size", "16",
                 "--test-subset", "100", "--latency-batch", "2", "--threads", "1",
                 "--state-dir", str(tmp_path / "stages"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "musco stage 2/2" in text and "MACs ratio" in text
    plan = ts.CompressionPlan.load(out / "plan.json")
    assert 0.49 <= plan.macs_ratio <= 0.5 and plan.compressed
    assert (out / "report.md").is_file() and (tmp_path / "stages" / "stage_2" / "plan.json").is_file()
    assert main(["evaluate", "--checkpoint", str(out), "--no-accuracy", "--latency-batch", "2",
                 "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == plan.macs_after


def test_final_ranks_rule_ends_at_the_one_shot_plan_and_round_trips(tmp_path):
    net, x = _vgg(), X
    plan = ts.make_plan(net, "tucker", x, target_macs=0.3, rank_rule="uniform")
    final = {s.name: s.rank for s in plan.compressed}
    res = musco(net, "tucker", x, stages=3, stage_ranks=final, target_macs=plan.macs_ratio,
                state_dir=tmp_path, progress=False)
    assert res.stages_done == 3 and res.stop_reason == "MAC target reached"
    assert {s.name: s.rank for s in res.plan.compressed} == final  # the very same final ranks
    assert res.plan.macs_after == plan.macs_after
    ratios = [h["macs_ratio"] for h in res.history]
    assert 1.0 > ratios[0] > ratios[1] > ratios[2] == pytest.approx(plan.macs_ratio, rel=1e-12)
    seq = lambda r: tuple(r) if isinstance(r, (list, tuple)) else (r,)  # noqa: E731 (SVD: an int)
    assert any(s.method == "svd" for s in plan.compressed)  # tucker plans take Linear layers by SVD
    for n, r in final.items():  # every stage between dense and the final rank
        for h in res.history:
            got = h["ranks"].get(n)
            assert got is None or all(a >= b for a, b in zip(seq(got), seq(r)))
    # the config (with the mapping) is saved as JSON and a re-run resumes as done
    again = musco(net, "tucker", x, stages=3, stage_ranks=final, target_macs=plan.macs_ratio,
                  state_dir=tmp_path, progress=False)
    assert again.plan == res.plan and again.stages_done == 3
    with pytest.raises(ValueError, match="final ranks must map layer names"):
        musco(net, "tucker", x, stage_ranks={"features.3": 0}, target_macs=0.5, progress=False)


def test_refit_every_stage_before_fine_tuning(train):
    dense = _vgg()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    res = musco(dense, "tucker", X, train_loader=train, stages=2, finetune_steps_per_stage=0,
                target_macs=0.5, reconstruct_steps=2, bn_steps=0, seed=3, progress=False)
    assert res.stages_done == 2
    for rec in res.history:
        fits = rec["finetune"]["reconstruct"]
        assert sorted(f["name"] for f in fits) == sorted(rec["ranks"])  # every factorized layer
        assert all(f["error_after"] <= f["error_before"] for f in fits)
        assert all(f["samples"] > 0 for f in fits)
        assert any(f["error_after"] < 0.99 * f["error_before"] for f in fits)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="reconstruct_steps must be an int >= 0"):
        musco(dense, "tucker", X, train_loader=train, reconstruct_steps=-1)
    with pytest.raises(ValueError, match="reconstruct_steps > 0 needs a train_loader"):
        musco(dense, "tucker", X, reconstruct_steps=2)

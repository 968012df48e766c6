import copy
import json

import pytest
import torch

import tensorslim as ts


def test_save_load_round_trip_with_user_model(small_cnn, image, tmp_path):
    dense = copy.deepcopy(small_cnn)
    plan = ts.make_plan(small_cnn, "tucker", image, target_macs=0.4)
    model = ts.compress(small_cnn, plan, progress=False)
    ts.save(model, plan, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["meta.json", "model.safetensors", "plan.json"]
    again = ts.load(tmp_path / "ckpt", model=dense)
    torch.testing.assert_close(again(image), model(image), rtol=0, atol=0)


def test_load_refuses_bad_checkpoints(small_cnn, seq_net, image, tmp_path):
    plan = ts.make_plan(small_cnn, "svd", image, target_macs=0.6)
    model = ts.compress(copy.deepcopy(small_cnn), plan, progress=False)
    ck = ts.save(model, plan, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not have"):
        ts.load(ck, model=seq_net)
    # truncated weights file
    w = ck / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ts.load(ck, model=copy.deepcopy(small_cnn))
    # unknown format version
    ts.save(model, plan, ck, overwrite=True)
    meta = json.loads((ck / "meta.json").read_text())
    meta["format_version"] = 42
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 42"):
        ts.load(ck, model=copy.deepcopy(small_cnn))
    # no registry architecture recorded and no model given
    ts.save(model, plan, ck, overwrite=True)
    with pytest.raises(ValueError, match="model="):
        ts.load(ck)
    with pytest.raises(FileNotFoundError, match="not a tensorslim checkpoint"):
        ts.load(tmp_path / "nowhere", model=small_cnn)


def test_load_refuses_shape_mismatch(small_cnn, image, tmp_path):
    ts.save(small_cnn, ts.CompressionPlan(layers=(), method="keep"), tmp_path / "dense")
    other = copy.deepcopy(small_cnn)
    other.head[3] = torch.nn.Linear(128, 11)
    with pytest.raises(ValueError, match=r"head.3.weight: checkpoint \(10, 128\) vs model \(11, 128\)"):
        ts.load(tmp_path / "dense", model=other)


def test_save_is_atomic_on_failure(small_cnn, tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(RuntimeError):
        ts.save(small_cnn, ts.CompressionPlan(layers=(), method="keep"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []

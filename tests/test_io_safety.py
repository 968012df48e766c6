"""Issue 14, items 1, 2 and 12: save never deletes what it did not write, concurrent saves
all end with a loadable checkpoint, and a wrong checkpoint is refused before anything real
is built."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim import io as ts_io
from tensorslim import models

EMPTY = ts.CompressionPlan(layers=(), method="keep")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


# ---- item 1: overwrite only a tensorslim checkpoint, and only when asked -------------------

def test_save_refuses_a_foreign_folder_a_file_and_the_working_folder(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "results.csv").write_text("x")
    with pytest.raises(ValueError, match=f"{exp}: the folder is not empty and is not a tensorslim"):
        ts.save(_net(), EMPTY, exp)
    assert (exp / "results.csv").read_text() == "x" and os.listdir(exp) == ["results.csv"]
    f = tmp_path / "afile"
    f.write_text("y")
    with pytest.raises(ValueError, match=f"{f}: it exists and is not a folder"):
        ts.save(_net(), EMPTY, f, overwrite=True)
    assert f.read_text() == "y"
    monkeypatch.chdir(exp)
    with pytest.raises(ValueError, match="the current folder"):
        ts.save(_net(), EMPTY, ".", overwrite=True)
    assert os.listdir(exp) == ["results.csv"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "exp"]  # no temp folders left behind


def test_save_into_new_or_empty_folder_and_overwrite_only_when_asked(tmp_path):
    (tmp_path / "empty").mkdir()
    ts.save(_net(0), EMPTY, tmp_path / "empty")
    meta = json.loads((tmp_path / "empty" / "meta.json").read_text())
    assert meta["format"] == "tensorslim-checkpoint" and meta["format_version"] == 1
    ck = ts.save(_net(0), EMPTY, tmp_path / "ck")
    with pytest.raises(ValueError, match="already holds a tensorslim checkpoint; pass overwrite=True"):
        ts.save(_net(1), EMPTY, ck)
    ts.save(_net(1), EMPTY, ck, overwrite=True)
    torch.testing.assert_close(ts.load(ck, model=_net(5)).state_dict(), _net(1).state_dict(), rtol=0, atol=0)
    # a checkpoint folder that also holds someone else's file is never replaced
    (ck / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"also holds \['notes.txt'\]"):
        ts.save(_net(2), EMPTY, ck, overwrite=True)
    assert (ck / "notes.txt").read_text() == "mine"


def test_a_checkpoint_without_the_marker_still_counts(tmp_path):
    ck = ts.save(_net(0), EMPTY, tmp_path / "old")
    meta = json.loads((ck / "meta.json").read_text())
    del meta["format"]  # written by tensorslim before the marker existed
    (ck / "meta.json").write_text(json.dumps(meta))
    assert ts_io.is_checkpoint(ck)
    ts.save(_net(3), EMPTY, ck, overwrite=True)
    torch.testing.assert_close(ts.load(ck, model=_net(5)).state_dict(), _net(3).state_dict(), rtol=0, atol=0)
    (ck / "meta.json").write_text(json.dumps({"format_version": 1, "other": 1}))
    assert not ts_io.is_checkpoint(ck)


def test_save_refuses_a_plan_that_is_not_a_compression_plan(tmp_path):
    for bad in (None, {"a": 1}):
        with pytest.raises(TypeError, match="plan must be a tensorslim CompressionPlan"):
            ts.save(_net(), bad, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


# ---- item 2: concurrent saves, killed saves -------------------------------------------------

def _save_many(path: str, seed: int, n: int) -> list[str]:
    model, errors = _net(seed), []
    for _ in range(n):
        try:
            ts.save(model, EMPTY, path, overwrite=True)
        except Exception as e:  # noqa: BLE001 - collected and asserted on
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_concurrent_saves_all_succeed_and_the_last_one_wins(tmp_path):
    path = str(tmp_path / "ck")
    with mp.get_context("spawn").Pool(3) as pool:
        errors = pool.starmap(_save_many, [(path, seed, 5) for seed in range(3)])
    assert errors == [[], [], []]
    got = ts.load(path, model=_net(9)).state_dict()
    assert sum(all(torch.equal(got[k], v) for k, v in _net(s).state_dict().items()) for s in range(3)) == 1
    assert os.listdir(tmp_path) == ["ck"]


_HANG = """
import sys, time, safetensors.torch as st
import tensorslim as ts, torch
real = st.save_file
def slow(*a, **k):
    real(*a, **k); print("written", flush=True); time.sleep(600)
st.save_file = slow
ts.save(torch.nn.Linear(3, 2), ts.CompressionPlan(layers=(), method="keep"), sys.argv[1])
"""


def test_a_killed_save_leaves_temp_folders_that_the_next_save_removes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HANG, str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in os.listdir(tmp_path) if p.startswith(".ck.ts-tmp-")]
    assert left == [p for p in left if f"-{proc.pid}-" in p] and len(left) == 1
    legacy = tmp_path / ".ck-abcd_123"  # left by a killed save of an older tensorslim
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    ts.save(_net(), EMPTY, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["ck"]


def test_a_swap_killed_between_renames_puts_the_old_checkpoint_back(tmp_path):
    ck = ts.save(_net(4), EMPTY, tmp_path / "ck")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.replace(ck, tmp_path / f".ck.ts-old-{dead}-0-1")  # renamed aside, then the writer died
    assert ts_io.clean_stale_temps(ck) == [] and os.listdir(tmp_path) == ["ck"]
    torch.testing.assert_close(ts.load(ck, model=_net(5)).state_dict(), _net(4).state_dict(), rtol=0, atol=0)


# ---- item 12: the checkpoint's records are checked before anything real is built ------------

@pytest.fixture
def vgg_ckpt(tmp_path):
    model = models.create("vgg16", width=0.125)
    plan = ts.make_plan(model, "svd", torch.randn(1, 1, 28, 28), ranks=0.5, include=["classifier.*"])
    return ts.save(ts.compress(model, plan, progress=False), plan, tmp_path / "vgg")


def test_a_wider_architecture_in_meta_json_is_refused_on_the_meta_device(vgg_ckpt, monkeypatch):
    meta = json.loads((vgg_ckpt / "meta.json").read_text())
    meta["arch"]["kwargs"]["width"] = 16  # ~14 GiB of float32 parameters if built for real
    (vgg_ckpt / "meta.json").write_text(json.dumps(meta))
    from tensorslim.models import checkpoint

    built = []
    create = checkpoint.create

    def spy(*a, **k):
        m = create(*a, **k)
        built.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(checkpoint, "create", spy)
    # the plan replay (or the shape check against the weights' header) finds the wider layers
    with pytest.raises(ValueError, match=r"features.0\b.*\(8, 1, 3, 3\).*\(1024, 1, 3, 3\)"):
        ts.load(vgg_ckpt)
    assert built == ["meta"]
    monkeypatch.undo()
    meta["arch"]["kwargs"]["width"] = 0.125
    (vgg_ckpt / "meta.json").write_text(json.dumps(meta))
    # the honest record loads: the compressed model the plan describes, parameter for parameter
    plan = ts.CompressionPlan.load(vgg_ckpt / "plan.json")
    assert sum(p.numel() for p in ts.load(vgg_ckpt).parameters()) == plan.params_after


def test_a_dense_checkpoint_is_checked_against_the_weights_header(tmp_path, monkeypatch):
    ck = ts.save(models.create("vgg16", width=0.125), EMPTY, tmp_path / "dense")
    meta = json.loads((ck / "meta.json").read_text())
    meta["arch"]["kwargs"]["width"] = 16
    (ck / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(ts_io, "load_file", None, raising=False)  # never reached
    with pytest.raises(ValueError, match=r"model.safetensors does not match the model: .*features.0.weight: "
                                         r"checkpoint \(8, 1, 3, 3\) vs model \(1024, 1, 3, 3\)"):
        ts.load(ck)


CORRUPT = {
    "meta.json is a list": ("meta.json", b"[1, 2]", "meta.json is corrupt: expected a JSON object, got list"),
    "arch is a string": ("meta.json", None, r"meta.json: 'arch' must be an object"),
    "plan layers are ints": ("plan.json", b'{"version": 1, "method": "svd", "layers": [1, 2]}',
                             "plan.json is not a valid compression plan"),
    "binary meta.json": ("meta.json", os.urandom(300), "meta.json is corrupt"),
    "binary plan.json": ("plan.json", os.urandom(300), "plan.json is not a valid compression plan"),
    "binary weights": ("model.safetensors", os.urandom(300), "model.safetensors is truncated or corrupt"),
    "empty weights": ("model.safetensors", b"", r"too short for a header"),
    "unknown kwarg": ("meta.json", None, r"cannot build architecture 'vgg16'.*\['nope'\]"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_checkpoint_is_one_clear_value_error(vgg_ckpt, case):
    name, data, msg = CORRUPT[case]
    if data is None:
        meta = json.loads((vgg_ckpt / "meta.json").read_text())
        meta["arch"] = "vgg16" if case == "arch is a string" else {**meta["arch"], "kwargs": {"nope": 2}}
        data = json.dumps(meta).encode()
    (vgg_ckpt / name).write_bytes(data)
    with pytest.raises(ValueError, match=msg) as e:
        ts.load(vgg_ckpt)
    assert str(vgg_ckpt / name) in str(e.value)


def test_load_state_dict_file_names_the_file_for_pickles_and_empty_files(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="module.pt is not a state dict .* pickled objects other than tensors"):
        ts_io.load_state_dict_file(tmp_path / "module.pt")
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="e.safetensors is truncated or corrupt"):
        ts_io.load_state_dict_file(tmp_path / "e.safetensors")
    (tmp_path / "z.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="z.pt is not a state dict"):
        ts_io.load_state_dict_file(tmp_path / "z.pt")

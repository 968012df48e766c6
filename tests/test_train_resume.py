"""Resumable training: a run killed at any point and started again ends bit-identical to an
uninterrupted one; other settings, or a broken state file, are refused with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _ports import torchrun
import torch
from safetensors.torch import load_file
from torch import nn

import tensorslim.train_state as ts_state
from tensorslim.app.train_shipped import train_registry_model, train_state_path
from tensorslim.data import FashionMNIST, TensorBatchLoader, Transform
from tensorslim.data import fashion_mnist as fm
from tensorslim.train import TrainOptions, train
from tensorslim.train_state import read_state

needs_data = pytest.mark.skipif(
    not (fm.SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist")
HIST = ("epoch", "loss", "acc", "lr", "val_loss", "val_acc")
QUIET = {"progress": False, "log_every": 0}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Killed(Exception):
    """Stands for the process dying right after a state write."""


def _loader(n: int = 64, batch: int = 16, seed: int = 0) -> TensorBatchLoader:
    # augmented (random crops and flips drawn per epoch) and shuffled per epoch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    ds = FashionMNIST(images=images, labels=torch.arange(n) % 10,
                      transform=Transform(crop_pad=2, flip=True))
    return TensorBatchLoader(ds, batch, shuffle=True, augment=True, drop_last=True, seed=seed)


def _net(init_seed: int = 0) -> nn.Module:
    # BatchNorm (running buffers) and Dropout (draws from the global torch RNG every step)
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 10))


def _run(state: Path | None = None, init_seed: int = 0, **settings: Any) -> tuple[dict, dict]:
    model = _net(init_seed)
    args = {"epochs": 3, "lr": 0.05, "seed": 3, **QUIET, **settings}
    if state is not None:
        args["state_path"] = state
    hist = train(model, _loader(), val_loader=_loader(32, 16), **args)
    return {k: v.clone() for k, v in model.state_dict().items()}, hist


@pytest.fixture
def kill_after(monkeypatch: pytest.MonkeyPatch):
    """``kill_after(k)``: the k-th state write completes, then the run dies."""
    def arm(k: int) -> None:
        real, count = ts_state.write_state, [0]

        def write(path: Path, state: dict) -> None:
            real(path, state)
            count[0] += 1
            if count[0] == k:
                raise Killed(f"killed after write {k}")
        monkeypatch.setattr(ts_state, "write_state", write)
    yield arm
    monkeypatch.undo()


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_after_an_epoch_resumes_bit_identical(tmp_path: Path, kill_after, capsys) -> None:
    ref_sd, ref = _run()
    state = tmp_path / "run.pt"
    kill_after(1)  # the write at the end of epoch 1
    with pytest.raises(Killed):
        _run(state)
    saved = read_state(state)
    assert (saved["epoch"], saved["batch"], saved["step"], saved["sessions"]) == (1, 0, 4, 1)
    assert saved["history"]["loss"] == ref["loss"][:1]
    kill_after(10**9)
    capsys.readouterr()
    sd, hist = _run(state, init_seed=99)  # another initialisation: the state's weights win
    assert "train: resuming from epoch 2/3, batch 0/4 (step 4/12, session 2)" in capsys.readouterr().out
    assert _same_weights(sd, ref_sd)
    assert all(hist[k] == ref[k] for k in HIST) and hist["steps"] == ref["steps"] == 12
    assert (ref["sessions"], hist["sessions"]) == (1, 2)
    assert not state.exists() and list(tmp_path.iterdir()) == []  # finished: state deleted


@pytest.mark.parametrize("kills", [(1,), (2,), (3,), (5,), (1, 1, 2)])
def test_killed_anywhere_resumes_bit_identical(tmp_path: Path, kill_after, kills) -> None:
    # checkpoint_every=3 with 4 batches per epoch: writes at steps 3, 4 (epoch end), 6, 8, 9,
    # 12, ... so the kills land inside epochs and on their ends, once or several times
    ref_sd, ref = _run(checkpoint_every=3)
    state = tmp_path / "run.pt"
    positions = []
    for k in kills:
        kill_after(k)
        with pytest.raises(Killed):
            _run(state, checkpoint_every=3)
        s = read_state(state)
        positions.append((s["step"], s["epoch"], s["batch"]))
    kill_after(10**9)
    sd, hist = _run(state, checkpoint_every=3)
    assert _same_weights(sd, ref_sd)
    assert all(hist[k] == ref[k] for k in HIST)
    assert hist["sessions"] == len(kills) + 1 and not state.exists()
    expect = {(1,): [(3, 0, 3)], (2,): [(4, 1, 0)], (3,): [(6, 1, 2)], (5,): [(9, 2, 1)],
              (1, 1, 2): [(3, 0, 3), (4, 1, 0), (8, 2, 0)]}
    assert positions == expect[kills]


def test_writes_every_epoch_and_every_n_steps(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, int, int]] = []
    real = ts_state.write_state

    def write(path: Path, state: dict) -> None:
        seen.append((state["step"], state["epoch"], state["batch"]))
        real(path, state)
    monkeypatch.setattr(ts_state, "write_state", write)
    _run(tmp_path / "a.pt", checkpoint_every=3)
    assert seen == [(3, 0, 3), (4, 1, 0), (6, 1, 2), (8, 2, 0), (9, 2, 1), (12, 3, 0)]
    seen.clear()
    _run(tmp_path / "b.pt", max_steps=6)  # epoch ends only; the last (partial) epoch too
    assert seen == [(4, 1, 0), (6, 2, 0)]


def test_other_settings_are_refused_naming_them(tmp_path: Path, kill_after) -> None:
    state = tmp_path / "run.pt"
    kill_after(1)
    with pytest.raises(Killed):
        _run(state)
    before = state.read_bytes()
    with pytest.raises(ValueError) as e:
        _run(state, lr=0.1)
    msg = str(e.value)
    assert msg == (f"train: {state} holds the state of a different run (lr: 0.05 in the file, "
                   "0.1 now); re-run with the same settings to resume it, or delete the file "
                   "to start over")
    with pytest.raises(ValueError, match=r"\(epochs: 3 in the file, 4 now; seed: 3 in the file, 5 now\)"):
        _run(state, epochs=4, seed=5)
    with pytest.raises(ValueError, match=r"different run \(data\.batches: 4 in the file, 2 now; "
                                         r"data\.batch_size: 16 in the file, 32 now\)"):
        train(_net(), _loader(64, 32), epochs=3, lr=0.05, seed=3, state_path=state,
              val_loader=_loader(32, 16), **QUIET)
    with pytest.raises(ValueError, match=r"\(model: 'Sequential: 9 tensors, 707 values, shapes "
                                         r"[0-9a-f]{16}' in the file, 'Sequential: 2 tensors, "
                                         r"7850 values, shapes [0-9a-f]{16}' now\)"):
        train(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), _loader(), epochs=3, lr=0.05,
              seed=3, state_path=state, val_loader=_loader(32, 16), **QUIET)
    assert state.read_bytes() == before  # refused: never overwritten
    # settings that do not change the result may differ
    _, hist = _run(state, checkpoint_every=5, log_every=7)
    assert hist["sessions"] == 2 and not state.exists()


def test_broken_state_files_give_clear_errors(tmp_path: Path, kill_after) -> None:
    good = tmp_path / "good.pt"
    kill_after(1)
    with pytest.raises(Killed):
        _run(good)
    kill_after(10**9)
    data = good.read_bytes()
    cases = {
        "garbage.pt": (b"not a torch file at all", "cannot read the training state"),
        "truncated.pt": (data[: len(data) // 2], "cannot read the training state"),
    }
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"format": ts_state.FORMAT, "version": 1, "step": 4}, tmp_path / "partial.pt")
    torch.save({"format": ts_state.FORMAT, "version": 99}, tmp_path / "future.pt")
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    expect = {**{n: m for n, (_, m) in cases.items()},
              "foreign.pt": "is not a tensorslim training state",
              "partial.pt": "lacks \\['model', 'optimizer',",
              "future.pt": "is a version 99 training state; this tensorslim reads version 1"}
    for name, pattern in expect.items():
        path = tmp_path / name
        before = path.read_bytes()
        with pytest.raises(ValueError, match=pattern) as e:
            _run(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert path.read_bytes() == before


def test_finished_state_is_deleted_or_kept(tmp_path: Path, capsys) -> None:
    state = tmp_path / "run.pt"
    (tmp_path / f".{state.name}.abc123.tmp").write_bytes(b"left by a killed write")
    ref_sd, ref = _run(state)
    assert list(tmp_path.iterdir()) == []  # the state and stale temporary files are gone
    sd, hist = _run(state, keep_state=True)
    saved = read_state(state)
    assert saved["step"] == 12 and saved["epoch"] == 3 and _same_weights(sd, ref_sd)
    capsys.readouterr()
    again_sd, again = _run(state, init_seed=7, keep_state=True)  # returns the finished run
    assert "holds the finished run (step 12/12); nothing left to train" in capsys.readouterr().out
    assert _same_weights(again_sd, ref_sd) and all(again[k] == ref[k] for k in HIST)
    assert again["sessions"] == 2 and state.exists()


def test_resume_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"checkpoint_every must be an int >= 0 .* got -1"):
        TrainOptions(checkpoint_every=-1)
    with pytest.raises(TypeError, match="state_path must be a path or None, got 3"):
        TrainOptions(state_path=3)
    with pytest.raises(ValueError, match="keep_state must be True or False, got 'yes'"):
        TrainOptions(keep_state="yes")


@needs_data
def test_registry_training_resumes(tmp_path: Path, kill_after, capsys) -> None:
    cfg = dict(model="vgg16", width=0.125, epochs=2, batch_size=16, lr=0.05, seed=0, threads=1,
               subset=64, val_size=500, checkpoint_every=3, log_every=0, progress=False)
    ref = train_registry_model(cfg, out_dir=tmp_path / "a")
    out = tmp_path / "b"
    kill_after(3)  # step 6: epoch 2, batch 2
    with pytest.raises(Killed):
        train_registry_model(cfg, out_dir=out)
    state = train_state_path(out, "vgg16")
    assert state == out / ".vgg16.train_state.pt" and sorted(os.listdir(out)) == [state.name]
    kill_after(10**9)
    capsys.readouterr()
    meta = train_registry_model(cfg, out_dir=out)
    assert "train: resuming from epoch 2/2, batch 2/4 (step 6/8, session 2)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["vgg16.json", "vgg16.safetensors"]  # state deleted
    assert _same_weights(load_file(out / "vgg16.safetensors"),
                         load_file(tmp_path / "a" / "vgg16.safetensors"))
    info = json.loads((out / "vgg16.json").read_text())
    assert (ref["sessions"], info["sessions"], meta["sessions"]) == (1, 2, 2)
    assert info["test_accuracy"] == ref["test_accuracy"] and info["steps"] == 8
    assert all(info["history"][k] == ref["history"][k] for k in HIST)
    assert info["train_time_s"] >= 0 and info["history"]["sessions"] == 2
    kill_after(1)  # another run's settings into the same folder are refused
    with pytest.raises(Killed):
        train_registry_model(cfg, out_dir=out)
    with pytest.raises(ValueError, match=r"different run \(lr: 0.05 in the file, 0.1 now\)"):
        train_registry_model(cfg, out_dir=out, lr=0.1)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, sys.argv[2])
    import tensorslim.train_state as ts_state
    from test_train_resume import _run
    torch.set_num_threads(1)
    real = ts_state.write_state
    def slow_write(path, state):
        real(path, state)
        time.sleep(0.05)  # so that the parent can kill it mid-run
    ts_state.write_state = slow_write
    _run(__import__("pathlib").Path(sys.argv[1]), checkpoint_every=1, epochs=12)
""")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    state = tmp_path / "run.pt"
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(state), str(Path(__file__).parent)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    killed_at = read_state(state)["step"]
    assert 1 <= killed_at < 48
    ref_sd, ref = _run(checkpoint_every=1, epochs=12)
    sd, hist = _run(state, checkpoint_every=1, epochs=12)
    assert _same_weights(sd, ref_sd) and all(hist[k] == ref[k] for k in HIST)
    assert hist["sessions"] == 2 and list(tmp_path.iterdir()) == [script]


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, torch
    import tensorslim.models as models
    import tensorslim.train_state as ts_state
    from tensorslim.data import make_loaders
    from tensorslim.train import train

    out, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if mode == "kill" and rank == 0:
        real, n = ts_state.write_state, [0]
        def write(path, state):
            real(path, state)
            n[0] += 1
            if n[0] == 2:
                os._exit(3)  # dies right after the second write (step 6, inside epoch 1)
        ts_state.write_state = write
    torch.manual_seed(100 + rank)
    model = models.create("resnet20", width=0.125)
    loaders = make_loaders(16, subset=256, val_size=500, seed=0)
    state = None if mode == "full" else os.path.join(out, "state.pt")
    hist = train(model, loaders.train, epochs=2, lr=0.05, val_loader=loaders.val, progress=False,
                 log_every=0, state_path=state, checkpoint_every=3)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
    keep = {k: hist[k] for k in ("epoch", "loss", "acc", "lr", "val_acc", "steps", "sessions")}
    open(os.path.join(out, f"{mode}{rank}.json"), "w").write(json.dumps({"digest": h.hexdigest(), **keep}))
""")


@needs_data
@pytest.mark.slow
def test_ddp_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT)

    def launch(mode: str) -> subprocess.CompletedProcess:
        cmd, env = torchrun(script, tmp_path, mode)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    for mode in ("full", "kill", "resume"):
        proc = launch(mode)
        assert (proc.returncode != 0) == (mode == "kill"), proc.stdout[-3000:] + proc.stderr[-3000:]
        if mode == "kill":
            s = read_state(tmp_path / "state.pt")
            assert (s["step"], s["epoch"], s["batch"], len(s["sums"])) == (6, 0, 6, 2)
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text())
            for name in ("full0", "full1", "resume0", "resume1")}
    assert runs["full0"]["steps"] == 16 and runs["resume0"]["sessions"] == 2
    for key in ("digest", "loss", "acc", "lr", "val_acc", "epoch"):
        assert runs["resume0"][key] == runs["resume1"][key] == runs["full0"][key] == runs["full1"][key]
    assert not (tmp_path / "state.pt").exists()

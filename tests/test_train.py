"""Training loop: learning on real data, determinism, distillation, errors, and 2-process DDP."""
from __future__ import annotations

import json
import math
import subprocess
import textwrap
from pathlib import Path

import pytest
from _ports import torchrun
import torch

import tensorslim.models as models
from tensorslim.data import FashionMNIST, TensorBatchLoader, make_loaders
from tensorslim.data import fashion_mnist as fm
from tensorslim.app.train_shipped import RegistryTrainConfig, train_registry_model
from tensorslim.train import (
    FINE_TUNE,
    TrainOptions,
    _lr_factor,
    channels_last_unsafe,
    distillation_loss,
    evaluate,
    fine_tune,
    train,
)

needs_data = pytest.mark.skipif(
    not (fm.SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _toy_loader(n: int = 64, batch: int = 16) -> TensorBatchLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    ds = FashionMNIST(images=images, labels=torch.arange(n) % 10)
    return TensorBatchLoader(ds, batch, shuffle=True, drop_last=True)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("resnet20", width=0.125)


def test_same_seed_same_weights() -> None:
    runs = []
    for _ in range(2):
        model = _tiny()
        hist = train(model, _toy_loader(), epochs=2, lr=0.05, seed=3, progress=False, log_every=0)
        runs.append((model.state_dict(), hist))
    (sd_a, hist_a), (sd_b, hist_b) = runs
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert hist_a["loss"] == hist_b["loss"] and hist_a["steps"] == 8 and hist_a["epoch"] == [1, 2]


def test_max_steps_and_history_shape() -> None:
    model = _tiny()
    hist = train(model, _toy_loader(), epochs=5, max_steps=6, optimizer="adamw", lr=1e-3,
                 val_loader=_toy_loader(32), progress=False, log_every=0)
    assert hist["steps"] == 6 and hist["epoch"] == [1, 2]  # 4 batches per epoch
    assert len(hist["val_acc"]) == 2 and 0.0 <= hist["val_acc"][0] <= 1.0
    assert hist["world_size"] == 1 and hist["lr"][-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule() -> None:
    assert _lr_factor(0, 100, 0, "cosine") == 1.0
    assert _lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert _lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    assert _lr_factor(4, 100, 10, "cosine") == pytest.approx(0.5)  # warm-up
    assert _lr_factor(70, 100, 0, "constant") == 1.0


def test_evaluate_counts_and_restores_mode() -> None:
    model = _tiny().train()
    loader = TensorBatchLoader(_toy_loader(50).dataset, 16)
    res = evaluate(model, loader)
    assert res["n"] == 50 and model.training
    model.eval()
    with torch.no_grad():
        xs = torch.cat([x for x, _ in loader])
        ys = torch.cat([y for _, y in loader])
        out = model(xs)
    assert res["accuracy"] == pytest.approx((out.argmax(1) == ys).double().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, ys).item(), rel=1e-5)


def test_distillation() -> None:
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(8, 10), 4.0).item() > 0
    teacher, student = _tiny(), models.create("resnet20", width=0.125)
    before = [p.clone() for p in teacher.parameters()]
    hist = fine_tune(student, _toy_loader(), teacher=teacher, distill_alpha=0.7, progress=False,
                     log_every=0)
    assert hist["steps"] == 4 and torch.isfinite(torch.tensor(hist["loss"])).all()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_argument_errors() -> None:
    model, loader = _tiny(), _toy_loader()
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*sgd"):
        train(model, loader, optimizer="adam")
    with pytest.raises(ValueError, match="unknown schedule"):
        train(model, loader, schedule="step")
    with pytest.raises(ValueError, match="epochs"):
        train(model, loader, epochs=0)
    with pytest.raises(ValueError, match="distill_alpha"):
        fine_tune(model, loader, distill_alpha=2.0)


@needs_data
@pytest.mark.slow
def test_learns_fashion_mnist_subset() -> None:
    loaders = make_loaders(64, subset=2000, augment=False)
    held_out = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(1000)), 500)
    torch.manual_seed(0)
    model = models.create("vgg16", width=0.125)
    hist = train(model, loaders.train, epochs=10, max_steps=200, lr=0.05, progress=False,
                 log_every=0, channels_last=True)
    res = evaluate(model, held_out)
    assert hist["steps"] == 200 and res["n"] == 1000
    assert res["accuracy"] >= 0.70  # chance is 0.10


@needs_data
def test_train_registry_model_writes_checkpoint(tmp_path: Path) -> None:
    meta = train_registry_model(model="resnet20", width=0.125, epochs=1, batch_size=32, lr=0.05,
                                seed=0, out_dir=tmp_path, threads=1, subset=64, max_steps=2,
                                log_every=0, progress=False)
    info = json.loads((tmp_path / "resnet20.json").read_text())
    assert info["arch"] == {"name": "resnet20",
                            "kwargs": {"width": 0.125, "in_channels": 1, "num_classes": 10}}
    assert info["steps"] == 2 and info["seed"] == 0 and info["torch_version"] == torch.__version__
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["command"]
    assert meta["test_accuracy"] == info["test_accuracy"]
    model = models.load_checkpoint("resnet20", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet20.json", "resnet20.safetensors"]
    assert isinstance(model, models.ResNet)


DDP_SCRIPT = textwrap.dedent("""
    import gc, hashlib, json, os, sys, torch
    import tensorslim.models as models
    from tensorslim.data import make_loaders
    from tensorslim.train import fine_tune

    def digest(model):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    torch.set_num_threads(1)
    gc.disable()  # only train()'s own collection may free the DDP wrapper's reference cycle
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
    model = models.create("resnet20", width=0.125)
    if rank == 0:
        open(os.path.join(out, "init.txt"), "w").write(digest(model))
    loaders = make_loaders(16, subset=256, val_size=500, seed=0)
    hist = fine_tune(model, loaders.train, max_steps=5, lr=0.05, val_loader=loaders.val,
                     progress=False, log_every=0)
    result = {"digest": digest(model), "steps": hist["steps"], "loss": hist["loss"],
              "val_acc": hist["val_acc"], "world_size": hist["world_size"],
              # a DDP wrapper alive after train() holds the destroyed gloo group until exit
              "ddp_alive": sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                               for o in gc.get_objects())}
    open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(result))
""")


@needs_data
@pytest.mark.slow
def test_ddp_two_processes_agree(tmp_path: Path) -> None:
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT)
    cmd, env = torchrun(script, tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    init = (tmp_path / "init.txt").read_text()
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] == 5
    assert r0["digest"] == r1["digest"] != init  # identical weights on both ranks, trained
    assert r0["loss"] == r1["loss"] and r0["val_acc"] == r1["val_acc"]  # all-reduced metrics
    assert len(r0["val_acc"]) == 1 and 0.0 <= r0["val_acc"][0] <= 1.0
    assert r0["ddp_alive"] == r1["ddp_alive"] == 0


def test_channels_last_guard_finds_narrow_strided_1x1() -> None:
    # oneDNN's channels-last backward of these convs aborts the process on some CPUs
    model = models.create("resnet20", width=0.125)  # shortcuts 2->4 and 4->8 channels, stride 2
    names = channels_last_unsafe(model, torch.device("cpu"))
    assert names == ["layers.1.0.shortcut.0", "layers.2.0.shortcut.0"]
    assert channels_last_unsafe(model, torch.device("meta")) == []
    assert channels_last_unsafe(models.create("resnet20", width=0.5), torch.device("cpu")) == []
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    with pytest.warns(RuntimeWarning, match="channels_last=True ignored"):
        hist = train(model, [(x, y)], epochs=1, lr=0.01, progress=False, log_every=0,
                     channels_last=True)
    assert hist["steps"] == 1 and math.isfinite(hist["loss"][0])


def test_fine_tune_steps_runs_exactly_that_many_steps_cycling_the_loader() -> None:
    # 4 batches per epoch, 10 steps: 3 epochs (4 + 4 + 2), the cosine schedule spans the 10 steps
    a, b = _tiny(), _tiny()
    hist = fine_tune(a, _toy_loader(), steps=10, lr=0.05, seed=2, progress=False, log_every=0)
    assert hist["steps"] == 10 and hist["epoch"] == [1, 2, 3]
    assert hist["lr"][-1] == pytest.approx(0.05 * _lr_factor(10, 10, 0, "cosine"), abs=1e-12)
    # the same as the epochs form with a step cap (what callers wrote before steps= existed)
    old = fine_tune(b, _toy_loader(), epochs=3, max_steps=10, lr=0.05, seed=2, progress=False,
                    log_every=0)
    assert old["loss"] == hist["loss"] and old["steps"] == 10
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # fewer steps than one epoch: one (partial) epoch
    short = fine_tune(_tiny(), _toy_loader(), steps=3, progress=False, log_every=0)
    assert short["steps"] == 3 and short["epoch"] == [1]


def test_fine_tune_steps_errors() -> None:
    model, loader = _tiny(), _toy_loader()
    with pytest.raises(ValueError, match="give epochs or steps, not both"):
        fine_tune(model, loader, epochs=2, steps=5)
    with pytest.raises(ValueError, match="give steps or max_steps, not both"):
        fine_tune(model, loader, steps=5, max_steps=3, progress=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive int or None"):
            fine_tune(model, loader, steps=bad, progress=False)


def test_options_object_mapping_and_keywords_train_the_same() -> None:
    # one TrainOptions, a mapping of its fields, or the same fields as keywords: one run
    opts = TrainOptions(epochs=2, lr=0.03, progress=False, log_every=0)
    runs = []
    for args, kwargs in [((opts,), {}), (({"epochs": 2, "lr": 0.03},), {"progress": False, "log_every": 0}),
                         ((), {"epochs": 2, "lr": 0.03, "progress": False, "log_every": 0}),
                         ((TrainOptions(epochs=2, lr=0.5, progress=False, log_every=0),), {"lr": 0.03})]:
        model = _tiny()
        hist = train(model, _toy_loader(), *args, seed=1, **kwargs)
        runs.append((hist["loss"], hist["lr"], model.state_dict()))
    for loss, lrs, sd in runs[1:]:
        assert loss == runs[0][0] and lrs == runs[0][1]
        assert all(torch.equal(sd[k], runs[0][2][k]) for k in sd)
    assert runs[0][1][0] == pytest.approx(0.03 * _lr_factor(4, 8, 0, "cosine"))  # after epoch 1 of 2


def test_unknown_setting_is_a_one_line_type_error() -> None:
    model, loader = _tiny(), _toy_loader()
    with pytest.raises(TypeError) as e:
        train(model, loader, learning_rate=0.1)
    assert str(e.value).startswith("train: unknown setting(s) 'learning_rate'; accepted: epochs, optimizer, lr,")
    with pytest.raises(TypeError, match=r"fine_tune: unknown setting\(s\) 'stesp' \(did you mean 'steps'\?\)"):
        fine_tune(model, loader, stesp=3)
    with pytest.raises(TypeError, match="train: config must be a TrainOptions or a mapping of its fields, got int"):
        train(model, loader, 3)


def test_fine_tune_defaults_and_options() -> None:
    assert dict(FINE_TUNE) == {"lr": 0.005} and TrainOptions().lr == 0.05
    # fine_tune's lr default 0.005; a mapping keeps it, a TrainOptions is used as it is
    for options, lr in [(None, 0.005), ({"optimizer": "sgd"}, 0.005), (TrainOptions(lr=0.02), 0.02)]:
        hist = fine_tune(_tiny(), _toy_loader(), options, steps=2, schedule="constant",
                         progress=False, log_every=0)
        assert hist["steps"] == 2 and hist["lr"] == [lr]
    hist = fine_tune(_tiny(), _toy_loader(), epochs=None, steps=2, progress=False, log_every=0)
    assert hist["steps"] == 2  # epochs=None means the default, as before
    with pytest.raises(ValueError, match="give epochs or steps, not both"):
        fine_tune(_tiny(), _toy_loader(), {"epochs": 2}, steps=5)


def test_registry_train_config_defaults_and_checks() -> None:
    c = RegistryTrainConfig()
    assert (c.model, c.width, c.epochs, c.batch_size, c.lr, c.threads, c.out_dir) == \
        ("vgg16", 0.25, 30, 128, 0.05, 2, "runs/train")
    assert c.checkpoint_every == 100  # resumable state every 100 steps and every epoch
    for name, bad, msg in [("epochs", 0, "train: epochs must be an int >= 1, got 0"),
                           ("width", -1.0, "train: width must be a number > 0, got -1.0"),
                           ("subset", 0, "train: subset must be a positive int or None, got 0"),
                           ("checkpoint_every", -1, "train: checkpoint_every must be an int >= 0, got -1"),
                           ("weight_decay", -1e-4, "train: weight_decay must be a number >= 0, got -0.0001"),
                           ("model", "", "train: model must be a registry model name, got ''")]:
        with pytest.raises(ValueError) as e:
            RegistryTrainConfig(**{name: bad})
        assert str(e.value) == msg
    with pytest.raises(TypeError, match=r"train_registry_model: unknown setting\(s\) 'name'; accepted: model, width,"):
        train_registry_model(name="vgg16")

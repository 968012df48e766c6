"""Train a registry model on Fashion-MNIST and write the shippable checkpoint
(``tensorslim train``; the shipped weights were made with it)."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..configs import resolve
from ..train import evaluate, seed_everything, train
from ..train_state import remove_state


def train_state_path(out_dir: str | os.PathLike[str], model: str) -> Path:
    """Where :func:`train_registry_model` keeps the resumable state of ``model``'s run."""
    return Path(out_dir) / f".{model}.train_state.pt"


@dataclass(frozen=True)
class RegistryTrainConfig:
    """How :func:`train_registry_model` trains registry model ``model`` (at channel ``width``)
    and where it writes it. The defaults are the ``tensorslim train`` command's.

    SGD (momentum 0.9, nesterov) with a cosine schedule from ``lr`` for ``epochs`` over the
    ``60000 - val_size`` training images of the ``seed``-ed split, augmented by random crops
    of ``crop_pad`` pixels of padding and flips; ``pad_to_32`` trains on 32x32 inputs.
    ``subset`` (first N training images) and ``max_steps`` shorten a run (for tests).
    The resumable training state is written every epoch and every ``checkpoint_every``
    optimizer steps (0: epoch ends only)."""

    model: str = "vgg16"
    width: float = 0.25
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    out_dir: str | os.PathLike[str] = "runs/train"
    threads: int = 2
    weight_decay: float = 5e-4
    pad_to_32: bool = False
    crop_pad: int = 2
    val_size: int = 5000
    subset: int | None = None
    max_steps: int | None = None
    progress: bool = True
    log_every: int = 100
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"train: {name} must be {what}, got {getattr(self, name)!r}")

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "a registry model name")
        for name, low in (("epochs", 1), ("batch_size", 1), ("threads", 1), ("seed", 0),
                          ("crop_pad", 0), ("val_size", 0), ("log_every", 0),
                          ("checkpoint_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(name, f"an int >= {low}")
        for name in ("subset", "max_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad(name, "a positive int or None")
        for name, low in (("width", 0.0), ("lr", 0.0), ("weight_decay", None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    v >= 0 if low is None else v > low):
                raise bad(name, "a number >= 0" if low is None else "a number > 0")
        if not isinstance(self.pad_to_32, bool) or not isinstance(self.progress, bool):
            raise ValueError(f"train: pad_to_32 and progress must be True or False, got "
                             f"{self.pad_to_32!r}, {self.progress!r}")


def train_registry_model(config: RegistryTrainConfig | Mapping[str, Any] | None = None,
                         **settings: Any) -> dict[str, Any]:
    """Train a registry model on Fashion-MNIST and ship it to ``out_dir``.

    ``config`` (a :class:`RegistryTrainConfig`, a mapping of its fields, or None for the
    defaults) and ``settings`` (its fields by keyword, overriding ``config``) say what to
    train. Keeps the validation images unseen for compression experiments; reports validation
    and official-test accuracy; writes ``{model}.safetensors`` + ``{model}.json``. Returns the
    metadata written to the JSON.

    Resumable: the training state lives in ``out_dir/.{model}.train_state.pt`` while the run
    is under way. Killed at any moment, the same call (or ``tensorslim train`` command) run
    again continues from it ("resuming from epoch k") and ships the same weights as an
    uninterrupted run; other settings for the same ``out_dir`` and ``model`` are refused
    (delete the file to start over). The state is deleted once the checkpoint is written;
    the JSON records the training time summed over sessions and how many sessions it took."""
    from ..data import MEAN, STD, make_loaders
    from ..models import create, save_checkpoint
    from ..models.checkpoint import check_checkpoint_target

    c = resolve(RegistryTrainConfig, config, settings, "train_registry_model")
    check_checkpoint_target(c.out_dir, c.model)  # before hours of training, not after
    torch.set_num_threads(c.threads)
    seed_everything(c.seed)
    model = create(c.model, width=c.width)
    loaders = make_loaders(c.batch_size, val_size=c.val_size, seed=c.seed, augment=True,
                           pad_to_32=c.pad_to_32, crop_pad=c.crop_pad, subset=c.subset)
    state = train_state_path(c.out_dir, c.model)
    hist = train(model, loaders.train, epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay,
                 momentum=0.9, schedule="cosine", seed=c.seed, val_loader=loaders.val,
                 max_steps=c.max_steps, progress=c.progress, log_every=c.log_every,
                 channels_last=True, state_path=state, checkpoint_every=c.checkpoint_every,
                 keep_state=True)
    train_time = hist["time_s"]
    test = evaluate(model, loaders.test)
    meta = {
        "dataset": "fashion-mnist", "seed": c.seed, "epochs": c.epochs, "batch_size": c.batch_size,
        "lr": c.lr, "weight_decay": c.weight_decay, "optimizer": "sgd(momentum=0.9, nesterov)",
        "schedule": "cosine", "augment": {"crop_pad": c.crop_pad, "flip": True},
        "input": {"size": 32 if c.pad_to_32 else 28, "pad_to_32": c.pad_to_32,
                  "mean": MEAN, "std": STD},
        "split": {"val_size": c.val_size, "seed": c.seed, "train_size": len(loaders.train.dataset)},
        "steps": hist["steps"],
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": hist["val_acc"][-1] if hist["val_acc"] else None,
        "train_time_s": round(train_time, 1), "sessions": hist["sessions"], "threads": c.threads,
        "torch_version": torch.__version__, "history": hist,
    }
    save_checkpoint(model, c.out_dir, c.model, meta)
    remove_state(state)  # only now: the run's result is on disk
    print(f"{c.model}: test accuracy {test['accuracy']:.4f} after {c.epochs} epochs, "
          f"{train_time / 60:.1f} min in {hist['sessions']} session(s); wrote "
          f"{Path(c.out_dir) / c.model}.safetensors/.json", flush=True)
    return meta

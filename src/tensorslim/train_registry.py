"""Train a registry model on Fashion-MNIST and write the shippable checkpoint
(``tensorslim train``; the shipped weights were made with it)."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .train import evaluate, seed_everything, train


def train_registry_model(
    name: str,
    *,
    width: float,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    out_dir: str | os.PathLike[str],
    threads: int = 1,
    weight_decay: float = 5e-4,
    pad_to_32: bool = False,
    crop_pad: int = 2,
    val_size: int = 5000,
    subset: int | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train registered model ``name`` on Fashion-MNIST and ship it to ``out_dir``.

    Trains on the ``60000 - val_size`` training images of the seeded split (augmented),
    keeping the validation images unseen for compression experiments; reports validation
    and official-test accuracy; writes ``{name}.safetensors`` + ``{name}.json``. Returns the
    metadata written to the JSON. ``subset`` / ``max_steps`` shorten the run (for tests).
    """
    from tensorslim.data import MEAN, STD, make_loaders
    from tensorslim.models import create, save_checkpoint

    torch.set_num_threads(threads)
    seed_everything(seed)
    model = create(name, width=width)
    loaders = make_loaders(batch_size, val_size=val_size, seed=seed, augment=True,
                           pad_to_32=pad_to_32, crop_pad=crop_pad, subset=subset)
    t0 = time.perf_counter()
    hist = train(model, loaders.train, epochs=epochs, lr=lr, weight_decay=weight_decay,
                 momentum=0.9, schedule="cosine", seed=seed, val_loader=loaders.val,
                 max_steps=max_steps, progress=progress, log_every=log_every,
                 channels_last=True)
    train_time = time.perf_counter() - t0
    test = evaluate(model, loaders.test)
    meta = {
        "dataset": "fashion-mnist", "seed": seed, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "weight_decay": weight_decay, "optimizer": "sgd(momentum=0.9, nesterov)",
        "schedule": "cosine", "augment": {"crop_pad": crop_pad, "flip": True},
        "input": {"size": 32 if pad_to_32 else 28, "pad_to_32": pad_to_32,
                  "mean": MEAN, "std": STD},
        "split": {"val_size": val_size, "seed": seed, "train_size": len(loaders.train.dataset)},
        "steps": hist["steps"],
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": hist["val_acc"][-1] if hist["val_acc"] else None,
        "train_time_s": round(train_time, 1), "threads": threads,
        "torch_version": torch.__version__, "history": hist,
    }
    save_checkpoint(model, out_dir, name, meta)
    print(f"{name}: test accuracy {test['accuracy']:.4f} after {epochs} epochs, "
          f"{train_time / 60:.1f} min; wrote {Path(out_dir) / name}.safetensors/.json", flush=True)
    return meta

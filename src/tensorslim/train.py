"""Training, fine-tuning (optionally distilled from a teacher) and evaluation loops.

One flat loop that runs on CPU or CUDA and, unchanged, under
``torchrun --nproc_per_node N``: it reads RANK / WORLD_SIZE / LOCAL_RANK, joins a process
group (gloo on CPU, nccl on GPU), wraps the model in DistributedDataParallel, gives every
rank its shard of each batch order, all-reduces the metrics, and only rank 0 prints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .configs import check_int, resolve
from .ddp import (Batches, DistEnv, all_reduce, resolve_device, setup_distributed, shard,
                  sync_buffers, teardown)
from .train_state import Checkpointer, Position, capture_rng, fingerprint, restore_rng, say_resumed

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainOptions:
    """The scalar settings of :func:`train` (validated on construction)."""

    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    distill_alpha: float = 0.5
    distill_T: float = 4.0
    max_steps: int | None = None
    steps: int | None = None
    log_every: int = 50
    progress: bool = True
    channels_last: bool = False
    state_path: str | os.PathLike[str] | None = None
    checkpoint_every: int = 0
    keep_state: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if not 0.0 <= self.distill_alpha <= 1.0 or not self.distill_T > 0:
            raise ValueError("need 0 <= distill_alpha <= 1 and distill_T > 0, got "
                             f"{self.distill_alpha!r}, {self.distill_T!r}")
        for name in ("max_steps", "steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.state_path is not None and not isinstance(self.state_path, (str, os.PathLike)):
            raise TypeError(f"state_path must be a path or None, got {self.state_path!r}")
        check_int("checkpoint_every", self.checkpoint_every, 0, hint="(0: epoch ends only)")
        if not isinstance(self.keep_state, bool):
            raise ValueError(f"keep_state must be True or False, got {self.keep_state!r}")


def _make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)


def train(model: nn.Module, train_loader: Batches,
          options: TrainOptions | Mapping[str, Any] | None = None, *,
          teacher: nn.Module | None = None, val_loader: Batches | None = None,
          device: torch.device | str | None = None, seed: int = 0,
          **settings: Any) -> dict[str, Any]:
    """Train ``model`` in place on batches ``(x (B, ...), y (B,) int64)``.

    ``options`` (a :class:`TrainOptions`, a mapping of its fields, or None for its defaults)
    and ``settings`` (its fields by keyword, overriding ``options``) give the loop's settings:
    ``train(m, loader, epochs=3, lr=0.1)`` or ``train(m, loader, TrainOptions(epochs=3))``.
    Loss: cross-entropy (``label_smoothing``), mixed with ``distill_alpha`` times the
    distillation loss when a ``teacher`` is given. The learning rate follows ``schedule``
    per step (after ``warmup_steps`` of linear warm-up). Stops after ``max_steps`` if set.
    ``steps`` instead runs exactly that many optimizer steps, cycling through the loader
    (a new epoch, with its own batch order, each time it runs out; ``epochs`` is then unused).
    ``channels_last`` runs convolutions in NHWC layout (often faster on CPU).

    Resumable: with ``state_path`` the run's state is written there (atomically) at the end of
    every epoch and every ``checkpoint_every`` optimizer steps (0: epoch ends only). Killed at
    any moment and called again with the same settings, it continues from that state and ends
    with the same weights and history as an uninterrupted run (same machine and threads); a
    state of other settings, or an unreadable file, raises a one-line ValueError naming what
    differs and is left untouched. The finished run deletes the state unless ``keep_state``
    (then a caller that writes its own checkpoint deletes it afterwards; called again, the
    kept state returns the finished model at once). See :mod:`tensorslim.train_state`.

    Returns the history: ``{"epoch", "loss", "acc", "lr", "val_loss", "val_acc"}`` (lists,
    one entry per epoch, accuracies in [0, 1]) plus ``"steps"``, ``"time_s"`` (training time,
    summed over the sessions of a resumed run), ``"sessions"`` (1 + the times it was resumed)
    and ``"world_size"``.
    """
    opts = resolve(TrainOptions, options, settings, "train")
    seed_everything(seed)
    env = setup_distributed(torch.device(device) if device is not None else None)
    try:
        return _train_loop(model, train_loader, teacher, val_loader, opts, env,
                           resolve_device(device, env), seed)
    finally:
        teardown(env)


def channels_last_unsafe(model: nn.Module, device: torch.device) -> list[str]:
    """Convs of ``model`` whose channels-last backward crashes oneDNN on CPU.

    PyTorch 2.13's CPU build (oneDNN 3.12) aborts the process ("double free or corruption")
    in the backward pass of a 1x1 conv with stride > 1 and fewer than 8 input channels per
    group on channels-last tensors (seen on an AVX2 AMD EPYC; NCHW is fine). Such a conv is
    the shortcut of a narrow ResNet's downsampling block.
    """
    if device.type != "cpu":
        return []
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
            and max(m.stride) > 1 and m.in_channels // m.groups < 8]


@dataclass
class _Run:
    """What every step of one training run uses."""

    net: nn.Module  # the model, DDP-wrapped when distributed
    teacher: nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    o: TrainOptions
    env: DistEnv
    device: torch.device
    epochs: int
    total: int  # optimizer steps of the whole run
    save: Any  # () -> None: write the resumable state, or None


def _train_loop(model: nn.Module, loader: Batches, teacher: nn.Module | None,
                val_loader: Batches | None, o: TrainOptions, env: DistEnv,
                device: torch.device, seed: int) -> dict[str, Any]:
    unsafe = channels_last_unsafe(model, device) if o.channels_last else []
    if unsafe:
        warnings.warn(f"train: channels_last=True ignored (NCHW used): the channels-last "
                      f"backward of the strided 1x1 convs {unsafe} with < 8 input channels "
                      "crashes oneDNN on CPU", RuntimeWarning, stacklevel=3)
        o = dataclasses.replace(o, channels_last=False)
    loader = shard(loader, env, even=True)
    net = _prepare(model, teacher, o, env, device)
    opt = _make_optimizer(model, o.optimizer, o.lr, o.weight_decay, o.momentum)
    epochs, total = _schedule_length(len(loader), o)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, o.warmup_steps, o.schedule))
    hist: dict[str, Any] = {k: [] for k in ("epoch", "loss", "acc", "lr", "val_loss", "val_acc")}
    ckpt, pos = None, Position()
    if o.state_path is not None:
        fp = fingerprint(o, seed, model, loader, teacher, val_loader, env.world_size)
        ckpt = Checkpointer(o.state_path, fp, env.rank, env.world_size, device)
        pos = ckpt.resume(model, opt, sched, hist)
        if env.is_main:
            say_resumed(pos, epochs, len(loader), total, o.state_path)  # type: ignore[arg-type]
    pos.sums = pos.sums.to(device)
    clock = time.perf_counter() - pos.time_s  # the run's training time is now - clock
    save = None if ckpt is None else (
        lambda: ckpt.save(model, opt, sched, hist, pos, time.perf_counter() - clock))
    run = _Run(net, teacher, opt, sched, o, env, device, epochs, total, save)
    while pos.step < total:
        _run_epoch(run, loader, pos)
        _end_epoch(hist, pos.epoch, pos.sums, opt, env, device, model, val_loader, o, clock)
        pos.epoch, pos.batch, pos.sums = pos.epoch + 1, 0, torch.zeros_like(pos.sums)
        if pos.step >= total:  # before the last save: a resumed finished run is then exact
            sync_buffers(model, env)
        if save is not None:
            save()
    if o.channels_last:
        model.to(memory_format=torch.contiguous_format)
    if ckpt is not None:
        ckpt.finish(o.keep_state)
    hist.update(steps=pos.step, time_s=time.perf_counter() - clock, sessions=pos.sessions,
                world_size=env.world_size)
    return hist


def _run_epoch(run: _Run, loader: Batches, pos: Position) -> None:
    """Train on epoch ``pos.epoch`` from its batch ``pos.batch`` to its end (or to the last
    step), writing the state every ``checkpoint_every`` steps."""
    o, env = run.o, run.env
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(pos.epoch)
    run.net.train()
    if pos.batch == 0 and run.save is not None:
        pos.rng_epoch = capture_rng(run.device)
    batches = iter(loader)
    for _ in range(pos.batch):  # resumed inside this epoch: skip the batches trained on
        next(batches)
    if pos.rng_pending is not None:
        restore_rng(pos.rng_pending, run.device)
        pos.rng_pending = None
    n = len(loader)  # type: ignore[arg-type]
    fmt = torch.channels_last if o.channels_last else torch.contiguous_format
    bar = tqdm(batches, initial=pos.batch, total=n, desc=f"epoch {pos.epoch + 1}/{run.epochs}",
               leave=False, disable=not (o.progress and env.is_main), dynamic_ncols=True)
    for x, y in bar:
        _step(run, x, y, pos.sums, fmt)
        pos.step += 1
        pos.batch += 1
        if o.log_every and pos.step % o.log_every == 0 and env.is_main:
            msg = f"loss {pos.sums[0] / pos.sums[2]:.4f} acc {pos.sums[1] / pos.sums[2]:.4f}"
            if o.progress:
                bar.set_postfix_str(msg)
            else:
                print(f"epoch {pos.epoch + 1} step {pos.step}/{run.total} {msg}", flush=True)
        if pos.step >= run.total:
            break
        if run.save is not None and o.checkpoint_every and pos.batch < n \
                and pos.step % o.checkpoint_every == 0:
            run.save()
    bar.close()


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor,
          fmt: torch.memory_format) -> None:
    """One optimizer step on batch ``(x, y)``; adds (loss * n, correct, n) to ``sums``."""
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if x.ndim == 4:
        x = x.contiguous(memory_format=fmt)
    out, loss = _batch_loss(run.net, run.teacher, x, y, run.o)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    with torch.no_grad():
        sums[0] += loss.detach().double() * y.numel()
        sums[1] += (out.argmax(1) == y).sum().double()
        sums[2] += y.numel()


def _schedule_length(batches: int, o: TrainOptions) -> tuple[int, int]:
    """(epochs, optimizer steps) for a loader of ``batches`` batches per epoch (this rank's)."""
    if batches < 1:
        raise ValueError("train_loader yields no batches")
    if o.steps is not None:
        if o.max_steps is not None:
            raise ValueError(f"give steps or max_steps, not both (got steps={o.steps}, "
                             f"max_steps={o.max_steps})")
        return math.ceil(o.steps / batches), o.steps
    total = batches * o.epochs
    return o.epochs, min(total, o.max_steps) if o.max_steps else total


def _prepare(model: nn.Module, teacher: nn.Module | None, o: TrainOptions, env: DistEnv,
             device: torch.device) -> nn.Module:
    """Move model and teacher to ``device``; the module to call (DDP-wrapped when distributed)."""
    model.to(device)
    if o.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
    if env.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _batch_loss(net: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                o: TrainOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) and the scalar training loss of one batch."""
    out = net(x)
    loss = F.cross_entropy(out, y, label_smoothing=o.label_smoothing)
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(x)
        kd = distillation_loss(out, t_out, o.distill_T)
        loss = (1 - o.distill_alpha) * loss + o.distill_alpha * kd
    return out, loss


def _end_epoch(hist: dict[str, Any], epoch: int, sums: torch.Tensor, opt: torch.optim.Optimizer,
               env: DistEnv, device: torch.device, model: nn.Module,
               val_loader: Batches | None, o: TrainOptions, t0: float) -> None:
    loss_sum, correct, n = all_reduce(sums.tolist(), env, device)
    hist["epoch"].append(epoch + 1)
    hist["loss"].append(loss_sum / max(n, 1))
    hist["acc"].append(correct / max(n, 1))
    hist["lr"].append(opt.param_groups[0]["lr"])
    msg = f"epoch {epoch + 1}: train loss {hist['loss'][-1]:.4f} acc {hist['acc'][-1]:.4f}"
    if val_loader is not None:
        if hasattr(val_loader, "set_epoch"):  # its k-th pass, also after a resume
            val_loader.set_epoch(epoch)
        val = evaluate(model, val_loader, device=device)
        hist["val_loss"].append(val["loss"])
        hist["val_acc"].append(val["accuracy"])
        msg += f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
    if env.is_main and (o.progress or o.log_every):
        print(f"{msg} | {time.perf_counter() - t0:.0f}s", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, device: torch.device | str | None = None
             ) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``loader``: ``{"accuracy", "loss", "n"}``.

    Inside a process group every rank scores its own shard and the sums are all-reduced.
    The model's train/eval mode is restored afterwards.
    """
    env = DistEnv()
    if dist.is_available() and dist.is_initialized():
        env = DistEnv(dist.get_rank(), dist.get_world_size())
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    for x, y in shard(loader, env, even=False):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum().double()
        sums[2] += y.numel()
    model.train(was_training)
    loss_sum, correct, n = all_reduce(sums.tolist(), env, dev)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": int(n)}


# fine_tune's defaults where they differ from TrainOptions' (a smaller learning rate)
FINE_TUNE: Mapping[str, Any] = MappingProxyType({"lr": 0.005})


def fine_tune(model: nn.Module, train_loader: Batches,
              options: TrainOptions | Mapping[str, Any] | None = None, *,
              teacher: nn.Module | None = None, val_loader: Batches | None = None,
              device: torch.device | str | None = None, seed: int = 0,
              **settings: Any) -> dict[str, Any]:
    """:func:`train` with fine-tuning defaults (:data:`FINE_TUNE` over :class:`TrainOptions`:
    SGD, lr 0.005, cosine), optionally distilling from ``teacher`` (typically the
    uncompressed model). Give ``epochs`` (default 1) or ``steps`` (exactly that many optimizer
    steps, cycling the loader; the cosine schedule spans them), not both. A ``TrainOptions``
    given as ``options`` is used as it is (with ``settings`` applied)."""
    given = {**(options if isinstance(options, Mapping) else {}), **settings}
    if given.get("epochs") is not None and given.get("steps") is not None:
        raise ValueError(f"fine_tune: give epochs or steps, not both (got epochs={given['epochs']!r}, "
                         f"steps={given['steps']!r})")
    settings = _without_none_epochs(settings)  # epochs=None: the default (one epoch)
    if options is None or isinstance(options, Mapping):
        options = {**FINE_TUNE, **_without_none_epochs(options or {})}
    opts = resolve(TrainOptions, options, settings, "fine_tune")
    return train(model, train_loader, opts, teacher=teacher, val_loader=val_loader,
                 device=device, seed=seed)


def _without_none_epochs(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not (k == "epochs" and v is None)}

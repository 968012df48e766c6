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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True if this call created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_distributed(device: torch.device | None) -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, owns_group=True)


def _teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _resolve_device(device: torch.device | str | None, env: DistEnv) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _shard(loader: Batches, env: DistEnv, *, even: bool) -> Batches:
    """This rank's share of an unsharded ``TensorBatchLoader``; other loaders are used as
    given (a ``DataLoader`` must bring its own ``DistributedSampler``)."""
    if env.world_size > 1 and hasattr(loader, "shard") and getattr(loader, "world_size", 1) == 1:
        return loader.shard(env.rank, env.world_size, even=even)  # type: ignore[attr-defined]
    return loader


def _all_reduce(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


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


def train(
    model: nn.Module,
    train_loader: Batches,
    *,
    epochs: int = 1,
    optimizer: str = "sgd",
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.5,
    distill_T: float = 4.0,
    max_steps: int | None = None,
    steps: int | None = None,
    val_loader: Batches | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place on batches ``(x (B, ...), y (B,) int64)``.

    Loss: cross-entropy (``label_smoothing``), mixed with ``distill_alpha`` times the
    distillation loss when a ``teacher`` is given. The learning rate follows ``schedule``
    per step (after ``warmup_steps`` of linear warm-up). Stops after ``max_steps`` if set.
    ``steps`` instead runs exactly that many optimizer steps, cycling through the loader
    (a new epoch, with its own batch order, each time it runs out; ``epochs`` is then unused).
    ``channels_last`` runs convolutions in NHWC layout (often faster on CPU).
    Returns the history: ``{"epoch", "loss", "acc", "lr", "val_loss", "val_acc"}`` (lists,
    one entry per epoch, accuracies in [0, 1]) plus ``"steps"``, ``"time_s"``,
    ``"world_size"``.
    """
    opts = TrainOptions(
        epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
        schedule=schedule, warmup_steps=warmup_steps, label_smoothing=label_smoothing,
        distill_alpha=distill_alpha, distill_T=distill_T, max_steps=max_steps, steps=steps,
        log_every=log_every, progress=progress, channels_last=channels_last)
    seed_everything(seed)
    env = _setup_distributed(torch.device(device) if device is not None else None)
    try:
        return _train_loop(model, train_loader, teacher, val_loader, opts, env,
                           _resolve_device(device, env))
    finally:
        _teardown(env)


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


def _train_loop(model: nn.Module, loader: Batches, teacher: nn.Module | None,
                val_loader: Batches | None, o: TrainOptions, env: DistEnv,
                device: torch.device) -> dict[str, Any]:
    unsafe = channels_last_unsafe(model, device) if o.channels_last else []
    if unsafe:
        warnings.warn(f"train: channels_last=True ignored (NCHW used): the channels-last "
                      f"backward of the strided 1x1 convs {unsafe} with < 8 input channels "
                      "crashes oneDNN on CPU", RuntimeWarning, stacklevel=3)
        o = dataclasses.replace(o, channels_last=False)
    loader = _shard(loader, env, even=True)
    net = _prepare(model, teacher, o, env, device)
    fmt = torch.channels_last if o.channels_last else torch.contiguous_format
    opt = _make_optimizer(model, o.optimizer, o.lr, o.weight_decay, o.momentum)
    epochs, total = _schedule_length(len(loader), o)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, o.warmup_steps, o.schedule))
    hist: dict[str, Any] = {k: [] for k in ("epoch", "loss", "acc", "lr", "val_loss", "val_acc")}
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not (o.progress and env.is_main), dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if x.ndim == 4:
                x = x.contiguous(memory_format=fmt)
            out, loss = _batch_loss(net, teacher, x, y, o)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                sums[0] += loss.detach().double() * y.numel()
                sums[1] += (out.argmax(1) == y).sum().double()
                sums[2] += y.numel()
            if o.log_every and step % o.log_every == 0 and env.is_main:
                msg = f"loss {sums[0] / sums[2]:.4f} acc {sums[1] / sums[2]:.4f}"
                if o.progress:
                    bar.set_postfix_str(msg)
                else:
                    print(f"epoch {epoch + 1} step {step}/{total} {msg}", flush=True)
            if step >= total:
                break
        bar.close()
        _end_epoch(hist, epoch, sums, opt, env, device, model, val_loader, o, t0)
        if step >= total:
            break
    if o.channels_last:
        model.to(memory_format=torch.contiguous_format)
    _sync_buffers(model, env)
    hist.update(steps=step, time_s=time.perf_counter() - t0, world_size=env.world_size)
    return hist


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


def _sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Make buffers (BN running stats) equal on all ranks: float ones are averaged."""
    if env.world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(env.world_size)
        else:
            dist.broadcast(buf, src=0)


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
    loss_sum, correct, n = _all_reduce(sums.tolist(), env, device)
    hist["epoch"].append(epoch + 1)
    hist["loss"].append(loss_sum / max(n, 1))
    hist["acc"].append(correct / max(n, 1))
    hist["lr"].append(opt.param_groups[0]["lr"])
    msg = f"epoch {epoch + 1}: train loss {hist['loss'][-1]:.4f} acc {hist['acc'][-1]:.4f}"
    if val_loader is not None:
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
    for x, y in _shard(loader, env, even=False):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum().double()
        sums[2] += y.numel()
    model.train(was_training)
    loss_sum, correct, n = _all_reduce(sums.tolist(), env, dev)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": int(n)}


def fine_tune(model: nn.Module, train_loader: Batches, *, epochs: int | None = None,
              steps: int | None = None, lr: float = 0.005, weight_decay: float = 5e-4,
              teacher: nn.Module | None = None, distill_alpha: float = 0.5,
              distill_T: float = 4.0, **kwargs: Any) -> dict[str, Any]:
    """:func:`train` with fine-tuning defaults (SGD, small lr, cosine), optionally distilling
    from ``teacher`` (typically the uncompressed model). Give ``epochs`` (default 1) or
    ``steps`` (exactly that many optimizer steps, cycling the loader; the cosine schedule
    spans them), not both. Other keywords go to :func:`train`."""
    if epochs is not None and steps is not None:
        raise ValueError(f"fine_tune: give epochs or steps, not both (got epochs={epochs!r}, "
                         f"steps={steps!r})")
    return train(model, train_loader, epochs=1 if epochs is None else epochs, steps=steps, lr=lr,
                 weight_decay=weight_decay, teacher=teacher, distill_alpha=distill_alpha,
                 distill_T=distill_T, **kwargs)

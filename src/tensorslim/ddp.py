"""Process-group plumbing of :func:`tensorslim.train.train` (one process, or one per rank
under ``torchrun``): where this process stands, its device, its shard of each batch order,
all-reduced metrics and rank-averaged buffers."""
from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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


def setup_distributed(device: torch.device | None) -> DistEnv:
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


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        # The DDP wrapper sits in a reference cycle, so it outlives train() and its reducer
        # keeps the gloo group alive past destroy_process_group; freed later (at exit) the
        # group's worker threads abort the process (SIGABRT, "terminate called without an
        # active exception"), seen once in CI. Collect it while the group is still whole.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(device: torch.device | str | None, env: DistEnv) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def shard(loader: Batches, env: DistEnv, *, even: bool) -> Batches:
    """This rank's share of an unsharded ``TensorBatchLoader``; other loaders are used as
    given (a ``DataLoader`` must bring its own ``DistributedSampler``)."""
    if env.world_size > 1 and hasattr(loader, "shard") and getattr(loader, "world_size", 1) == 1:
        return loader.shard(env.rank, env.world_size, even=even)  # type: ignore[attr-defined]
    return loader


def all_reduce(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Make buffers (BN running stats) equal on all ranks: float ones are averaged."""
    if env.world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(env.world_size)
        else:
            dist.broadcast(buf, src=0)

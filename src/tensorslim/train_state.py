"""Resumable training: the state file :func:`tensorslim.train.train` keeps at ``state_path``.

A run killed at any moment and started again with the same settings continues from the last
state written and ends with the same weights and history as an uninterrupted run (on the same
machine, torch version and thread count). The state is written atomically (a kill never leaves
half a file) at the end of every epoch and every ``checkpoint_every`` optimizer steps. It holds
the model and optimizer state, the learning-rate schedule's position, the step / epoch / batch
counters, the history so far, the epoch's running metric sums, the RNG states (torch, CUDA,
Python ``random``, NumPy) at the save point and at the start of its epoch, the training time
and number of sessions so far, and a fingerprint of every setting that decides the result.
The state is deleted once the run has finished (or, with ``keep_state``, by the caller once
it has written its own checkpoint): a finished run asked for again trains again.
Batch order needs no state of its own: a ``TensorBatchLoader`` draws it from
``(seed, epoch)``, and any other loader is rebuilt at the epoch's start RNG state and advanced
to the saved batch. Loaded with ``weights_only=True`` (no pickled code).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .files import atomic_write

FORMAT, VERSION = "tensorslim.train_state", 1
KEYS = ("model", "optimizer", "scheduler", "fingerprint", "epoch", "batch", "step", "sums",
        "history", "rng", "rng_epoch", "time_s", "sessions")
# TrainOptions fields that do not change the trained weights (left out of the fingerprint)
BOOKKEEPING = frozenset({"progress", "log_every", "state_path", "checkpoint_every", "keep_state"})


@dataclass
class Position:
    """Where a run stands: ``step`` optimizer steps done, ``batch`` batches of 0-based
    ``epoch`` done, ``sums`` = this rank's (loss * n, correct, n) over those batches."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    time_s: float = 0.0  # training time of the earlier sessions
    sessions: int = 1  # this session's number (1 + the sessions that wrote the state)
    rng_epoch: dict[str, Any] | None = None  # RNG states when this epoch started
    rng_pending: dict[str, Any] | None = None  # RNG states to restore once the epoch's
    # loader has been advanced to ``batch`` (a resume inside an epoch)


# ---------------------------------------------------------------- fingerprint

def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def module_signature(model: nn.Module) -> str:
    """``"Class: N tensors, M values, shapes <sha256 of names, shapes and dtypes>"``."""
    sd = model.state_dict()
    desc = [f"{k}:{tuple(v.shape)}:{v.dtype};".encode() for k, v in sd.items()]
    return (f"{type(model).__name__}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} "
            f"values, shapes {_digest(desc)}")


def _data_signature(loader: Any) -> dict[str, Any]:
    """What the training batches depend on, as far as the loader tells."""
    try:
        sig: dict[str, Any] = {"batches": len(loader)}
    except TypeError:
        sig = {"batches": None}
    for name in ("batch_size", "seed", "shuffle", "augment", "drop_last"):
        value = getattr(loader, name, None)
        if isinstance(value, (bool, int, float, str)):
            sig[name] = value
    ds = getattr(loader, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        sig["samples"] = len(ds)
        tf = getattr(ds, "transform", None)
        if dataclasses.is_dataclass(tf):
            sig["transform"] = repr(tf)
        tensors = [getattr(ds, n, None) for n in ("images", "labels")]
        if all(isinstance(t, torch.Tensor) for t in tensors):
            sig["content"] = _digest([_tensor_bytes(t) for t in tensors])  # type: ignore[arg-type]
    return sig


def fingerprint(options: Any, seed: int, model: nn.Module, loader: Any,
                teacher: nn.Module | None, val_loader: Any, world_size: int) -> dict[str, Any]:
    """The settings that decide a run's result, flat ``{name: plain value}``."""
    fp: dict[str, Any] = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                          if f.name not in BOOKKEEPING}
    fp.update(seed=seed, world_size=world_size, model=module_signature(model))
    if teacher is not None:
        sd = teacher.state_dict()
        fp["teacher"] = _digest([k.encode() + _tensor_bytes(v) for k, v in sd.items()])
    fp.update({f"data.{k}": v for k, v in _data_signature(loader).items()})
    if val_loader is not None:
        fp["val.samples"] = _data_signature(val_loader).get("samples")
    return fp


def check_fingerprint(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Raise a one-line ValueError naming every setting that differs."""
    missing = object()
    keys = [k for k in dict.fromkeys([*saved, *now])
            if saved.get(k, missing) != now.get(k, missing)]
    if keys:
        diffs = "; ".join(f"{k}: {saved.get(k, '(none)')!r} in the file, {now.get(k, '(none)')!r} now"
                          for k in keys)
        raise ValueError(f"train: {path} holds the state of a different run ({diffs}); re-run with "
                         "the same settings to resume it, or delete the file to start over")


def say_resumed(pos: Position, epochs: int, batches: int, total: int, path: Any) -> None:
    """Print where a resumed run continues (nothing for a fresh one)."""
    if pos.step >= total:
        print(f"train: {path} holds the finished run (step {pos.step}/{total}); nothing left "
              "to train", flush=True)
    elif pos.step > 0:
        print(f"train: resuming from epoch {pos.epoch + 1}/{epochs}, batch {pos.batch}/{batches} "
              f"(step {pos.step}/{total}, session {pos.sessions}) from {path}", flush=True)


# ---------------------------------------------------------------- RNG

def capture_rng(device: torch.device) -> dict[str, Any]:
    """The global RNG states (torch, CUDA on ``device``, Python, NumPy) as loadable values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                       int(has_gauss), float(gauss))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- file

def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a kill leaves the previous file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_state(path: Path) -> dict[str, Any]:
    """The state at ``path``, checked for format and completeness (one-line ValueErrors)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"train: cannot read the training state {path} ({type(e).__name__}: "
                         f"{reason}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"train: {path} is not a tensorslim training state (no "
                         f"'format': {FORMAT!r}); choose another state_path or delete it")
    if state.get("version") != VERSION:
        raise ValueError(f"train: {path} is a version {state.get('version')!r} training state; this "
                         f"tensorslim reads version {VERSION}; delete it to start over")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"train: the training state {path} lacks {missing}; delete it to start over")
    return state


def remove_state(path: Path) -> None:
    """Delete the state file and temporary files a killed write left next to it."""
    for p in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        p.unlink(missing_ok=True)


class Checkpointer:
    """Reads, checks and writes the state of one :func:`tensorslim.train.train` call.

    Under ``torch.distributed`` rank 0 reads the file and broadcasts it (every rank resumes
    from the same state) and only rank 0 writes; all ranks must call :meth:`save` together.
    """

    def __init__(self, path: str | os.PathLike[str], fp: dict[str, Any], rank: int,
                 world_size: int, device: torch.device) -> None:
        self.path, self.fp, self.device = Path(path), fp, device
        self.rank, self.world_size = rank, world_size

    def _read_checked(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = read_state(self.path)
        check_fingerprint(state["fingerprint"], self.fp, self.path)
        return state

    def load(self) -> dict[str, Any] | None:
        """The saved state if the file exists and matches this run, None if there is none."""
        if self.world_size == 1:
            return self._read_checked()
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [("ok", self._read_checked())]
            except ValueError as e:
                box = [("error", str(e))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise ValueError(value)
        return value

    def resume(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
               hist: dict[str, Any]) -> Position:
        """Load the saved state into ``model``, ``opt``, ``sched``, ``hist`` and the RNGs."""
        state = self.load()
        if state is None:
            return Position()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        hist.update({k: list(v) for k, v in state["history"].items()})
        pos = Position(state["epoch"], state["batch"], state["step"],
                       state["sums"][self.rank].to(torch.float64), float(state["time_s"]),
                       int(state["sessions"]) + 1, state["rng_epoch"])
        if pos.batch > 0:  # inside an epoch: rebuild its loader from the epoch's start RNG
            restore_rng(state["rng_epoch"], self.device)
            pos.rng_pending = state["rng"]
        else:
            restore_rng(state["rng"], self.device)
        return pos

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
             hist: dict[str, Any], pos: Position, time_s: float) -> None:
        sums = [pos.sums.detach().cpu()]
        if self.world_size > 1:  # every rank's running sums (a collective: all ranks call it)
            gathered = [torch.empty_like(pos.sums) for _ in range(self.world_size)]
            dist.all_gather(gathered, pos.sums)
            sums = [s.cpu() for s in gathered]
        if self.rank != 0:
            return
        state = {"format": FORMAT, "version": VERSION, "fingerprint": self.fp,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "epoch": pos.epoch, "batch": pos.batch,
                 "step": pos.step, "sums": sums, "history": {k: v for k, v in hist.items()},
                 "rng": capture_rng(self.device),
                 "rng_epoch": pos.rng_epoch if pos.batch > 0 else None,
                 "time_s": time_s, "sessions": pos.sessions}
        write_state(self.path, state)

    def finish(self, keep: bool) -> None:
        """After a finished run: delete the state unless ``keep`` (the caller deletes it once
        it has written its own checkpoint)."""
        if self.rank == 0 and not keep:
            remove_state(self.path)


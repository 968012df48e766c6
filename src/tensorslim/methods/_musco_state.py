"""MUSCO's resumable state: every finished stage in ``state_dir/stage_{k}/`` (a tensorslim
checkpoint) and ``state_dir/state.json`` (version, stage, config, dense-model fingerprint,
history). A run resumes only with the same settings and the same dense weights, and each
stage's recovery draws its batches and seed from the stage number alone, so a resumed run
repeats the uninterrupted one."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..plan import CompressionPlan

if TYPE_CHECKING:
    from ..recover import RecoverConfig

STATE = "state.json"
STATE_VERSION = 2  # version 1 stored the ``stage_ranks`` setting as ``rank_rule``


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Run:
    """Where a run keeps its stages: ``state_dir/stage_{k}/`` and ``state_dir/state.json``."""

    def __init__(self, cfg: Any, dense: nn.Module, state_dir: Path | None,
                 progress: bool) -> None:
        self.cfg, self.dense, self.dir, self.progress = cfg, dense, state_dir, progress
        self.fingerprint = _fingerprint(dense) if state_dir is not None else ""

    def resume(self, plan: CompressionPlan) -> tuple[nn.Module, CompressionPlan, list, bool, str]:
        """(model, plan, history, done, stop reason): a fresh copy of the dense model, or the
        last finished stage in ``state_dir``."""
        path = None if self.dir is None else self.dir / STATE
        if path is None or not path.is_file():
            return copy.deepcopy(self.dense), plan, [], False, ""
        state = json.loads(path.read_text())
        self._check(state, path)
        k, history = int(state["stage"]), list(state["history"])
        if k == 0:
            return copy.deepcopy(self.dense), plan, history, bool(state["done"]), state["reason"]
        from ..io import load

        stage = self.dir / f"stage_{k}"
        model = load(stage, copy.deepcopy(self.dense), progress=False).eval()
        if self.progress:
            print(f"musco: resuming after stage {k} from {stage}", flush=True)
        # the settings were checked equal: the goal written now names them as this version does
        saved = dataclasses.replace(CompressionPlan.load(stage / "plan.json"), goal=plan.goal)
        return model, saved, history, bool(state["done"]), state["reason"]

    def _check(self, state: dict, path: Path) -> None:
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"{path}: unknown musco state version {version!r}; this tensorslim "
                             f"reads versions 1 to {STATE_VERSION}")
        old, new = {"reconstruct_steps": 0, **state.get("config", {})}, self.cfg.to_dict()
        if version == 1 and "rank_rule" in old:
            old["stage_ranks"] = old.pop("rank_rule")
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"{path}: the saved run used other settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}); "
                             f"use the same settings to resume, or another state_dir")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path}: the saved run started from a different dense model (weights "
                             f"differ); pass the same model to resume, or use another state_dir")

    def save_stage(self, k: int, model: nn.Module, plan: CompressionPlan, history: list,
                   done: bool, reason: str) -> None:
        if self.dir is None:
            return
        from ..io import save

        save(model, plan, self.dir / f"stage_{k}", extra={"musco": {"stage": k}}, overwrite=True)
        self.save_state(k, history, done, reason)

    def save_state(self, k: int, history: list, done: bool, reason: str) -> None:
        if self.dir is None:
            return
        from ..files import write_text_atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"version": STATE_VERSION, "stage": k, "done": done, "reason": reason,
                 "config": self.cfg.to_dict(), "fingerprint": self.fingerprint, "history": history}
        write_text_atomic(self.dir / STATE, json.dumps(state, indent=2))


class _StageLoader:
    """A training loader whose epochs are offset per stage (new batch orders every stage,
    deterministic from the stage); everything else is the wrapped loader's."""

    def __init__(self, inner: Any, offset: int, start: int | None = None) -> None:
        # ``start``: the epoch (within the stage) set when it is first iterated
        self.inner, self.offset, self.start = inner, offset, start

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        if self.start is not None:
            self.set_epoch(self.start)
            self.start = None
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(self.offset + epoch)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "start"):
            raise AttributeError(name)
        if name == "shard" and hasattr(self.inner, "shard"):
            return lambda *a, **kw: _StageLoader(self.inner.shard(*a, **kw), self.offset, self.start)
        return getattr(self.inner, name)


def _recover_config(opts: Any, k: int) -> "RecoverConfig":
    """Stage ``k``'s recovery (``opts``: the run's ``MuscoOptions``): refit, BatchNorm
    re-calibration, KD fine-tuning seeded by (seed, k)."""
    from ..recover import RecoverConfig

    return RecoverConfig(reconstruct_steps=opts.reconstruct_steps, bn_steps=opts.bn_steps,
                         finetune_steps=opts.finetune_steps_per_stage, lr=opts.finetune_lr,
                         distill=opts.distill, seed=opts.seed * 1_000_003 + k)


def _stage_loaders(loader: Any, k: int) -> dict[str, Any]:
    """Stage ``k``'s loader per recovery step: the refit and the BatchNorm re-calibration each
    get a fixed batch order of their own (resumed runs see the same batches), fine-tuning
    the stage's epochs."""
    if loader is None:
        return {}
    return {"reconstruct": _StageLoader(loader, 10_000 * k, start=9_998),
            "bn": _StageLoader(loader, 10_000 * k, start=9_999),
            "finetune": _StageLoader(loader, 10_000 * k)}


def recover_stage(model: nn.Module, dense: nn.Module, loader: Any, opts: Any, k: int,
                  progress: bool) -> dict[str, Any]:
    """Data-aware refit (``opts.reconstruct_steps`` batches), BatchNorm re-calibration
    (``opts.bn_steps``) then ``opts.finetune_steps_per_stage`` SGD steps; the record of each."""
    from ..recover import recover

    rc = _recover_config(opts, k)
    res = recover(model, dense, rc, loaders=_stage_loaders(loader, k), progress=progress)
    out = {key: res.history[key] for key in ("reconstruct", "bn_batches") if key in res.history}
    if "finetune" not in res.history:
        return out
    hist = res.history["finetune"]
    return out | {"steps": hist["steps"], "loss": hist["loss"][-1], "acc": hist["acc"][-1], "seed": rc.seed}

"""MUSCO's resumable state: every finished stage in ``state_dir/stage_{k}/`` (a tensorslim
checkpoint) and ``state_dir/state.json`` (version, stage, config, dense-model fingerprint,
history). A run resumes only with the same settings and the same dense weights."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan import CompressionPlan

STATE = "state.json"
STATE_VERSION = 1


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
        return model, CompressionPlan.load(stage / "plan.json"), history, bool(state["done"]), state["reason"]

    def _check(self, state: dict, path: Path) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: unknown musco state version {state.get('version')!r}; "
                             f"this tensorslim reads version {STATE_VERSION}")
        old, new = {"reconstruct_steps": 0, **state.get("config", {})}, self.cfg.to_dict()
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

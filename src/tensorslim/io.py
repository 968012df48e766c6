"""Checkpoints: a folder with ``model.safetensors`` (tensors only), ``plan.json`` (the plan
to replay) and ``meta.json`` (format version, base architecture reference). Nothing is ever
unpickled; a ``.pt`` state dict is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .plan import CompressionPlan

FORMAT_VERSION = 1
WEIGHTS, PLAN, META = "model.safetensors", "plan.json", "meta.json"


def save(model: nn.Module, plan: CompressionPlan | None, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model``'s tensors, ``plan`` and metadata into the folder ``path`` atomically.

    The base architecture is recorded when the model came from ``tensorslim.models.create``
    (``model.tensorslim_arch``), so :func:`load` can rebuild it without the user's code.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_dedup_shared(state), str(tmp / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, "arch": getattr(model, "tensorslim_arch", None),
                "extra": extra or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if plan is not None:
            plan.save(tmp / PLAN)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _dedup_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: give each its own storage."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a tensorslim checkpoint folder (no {META}); "
                                f"expected {WEIGHTS}, {META} and optionally {PLAN}")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / META} is corrupt: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format_version {meta.get('format_version')!r}; "
                         f"this tensorslim reads version {FORMAT_VERSION}")
    return meta


def load(path: str | os.PathLike, model: nn.Module | None = None, *, progress: bool = False) -> nn.Module:
    """Rebuild a (compressed) model from a checkpoint folder.

    ``model`` is the user's uncompressed architecture instance (any ``nn.Module``); when
    omitted, the base architecture recorded in the checkpoint is rebuilt from the registry.
    The plan is replayed (factorized layers of the right shapes) and all tensors are loaded;
    every key and shape must match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .surgery import compress

    path = Path(path)
    meta = read_meta(path)
    if model is None:
        arch = meta.get("arch")
        if not arch:
            raise ValueError(f"{path}: the checkpoint records no registry architecture; pass the "
                             f"uncompressed model instance as load(path, model=...)")
        from .models import create

        model = create(arch["name"], **arch.get("kwargs", {}))
    if (path / PLAN).is_file():
        plan = CompressionPlan.load(path / PLAN)
        compress(model, plan, decompose=False, progress=progress)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS}")
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is truncated or corrupt: {e}") from None
    load_state_checked(model, state, str(path / WEIGHTS))
    return model


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it into
    place: readers never see a half-written file, and on error nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape, with a clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or bad:
        raise ValueError(f"{source} does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {extra[:10]}, shape mismatches {bad[:10]}")
    model.load_state_dict(state, strict=True)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth`` file (never unpickles code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (got {type(obj).__name__})")
    return obj

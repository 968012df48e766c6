"""Checkpoints: a folder with ``model.safetensors`` (tensors only), ``plan.json`` (the plan
to replay) and ``meta.json`` (``"format": "tensorslim-checkpoint"``, format version, base
architecture reference). Nothing is ever unpickled; a ``.pt`` state dict is read with
``torch.load(weights_only=True)``.

Overwrite rule: :func:`save` writes into a new path or an empty folder. It replaces a folder
only when that folder is itself a tensorslim checkpoint (its meta.json says so) *and* the
caller passed ``overwrite=True``; it never replaces a file or a foreign folder, and refuses a
checkpoint folder that also holds files tensorslim does not write. Concurrent saves to one
path are serialised by a lock on the parent folder (last writer wins); temporary folders
carry the writer's pid, and those of dead processes are removed by the next save there.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import (atomic_write, check_writable, existing_folder, folder_lock, pid_alive,
                    swap_into_place, write_text_atomic)
from .plan import CompressionPlan
from .statedict import check_shapes, load_state_checked, load_state_dict_file, safetensors_shapes

__all__ = ["save", "load", "read_meta", "is_checkpoint", "check_save_target", "clean_stale_temps",
           "load_state_checked", "load_state_dict_file", "atomic_write", "write_text_atomic",
           "check_writable"]

FORMAT_VERSION = 1
FORMAT_MARKER = "tensorslim-checkpoint"
WEIGHTS, PLAN, META = "model.safetensors", "plan.json", "meta.json"
# files tensorslim itself writes into a checkpoint folder (compress: report; export: ONNX)
OWN_FILES = (WEIGHTS, PLAN, META, "report.md", "summary.png", "layers.png")
_LEGACY_META_KEYS = {"format_version", "arch", "extra"}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save` (its meta.json carries the format
    marker, or is a pre-marker version-1 record ``{format_version, arch, extra}``)."""
    meta_path = Path(path) / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    return meta.get("format") == FORMAT_MARKER or (
        meta.get("format_version") == FORMAT_VERSION and set(meta) == _LEGACY_META_KEYS)


def _own_entry(name: str) -> bool:
    return (name in OWN_FILES or name.endswith((".onnx", ".onnx.data"))
            or (name.startswith(".") and name.endswith(".tmp")))  # an atomic_write leftover


def check_save_target(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise unless :func:`save` may write a checkpoint at ``path`` (see the module's
    overwrite rule). Call it before long work whose result goes there. Returns the
    absolute path."""
    path = Path(os.path.abspath(path))
    with folder_lock(existing_folder(path.parent)):  # not while another save swaps
        return _check_target(path, overwrite)


def _check_target(path: Path, overwrite: bool) -> Path:
    cwd = Path(os.getcwd())
    if path == path.parent or path == cwd or path in cwd.parents:
        raise ValueError(f"refusing to write a checkpoint at {path}: it is the current folder, "
                         f"one above it, or the root; choose a new folder")
    if not path.exists() and not path.is_symlink():
        check_writable(path.parent, path)
        return path
    if not path.is_dir():
        raise ValueError(f"refusing to write a checkpoint at {path}: it exists and is not a folder "
                         f"(save never replaces a file); choose a new path")
    entries = sorted(os.listdir(path))
    if entries and not is_checkpoint(path):
        raise ValueError(f"refusing to write a checkpoint into {path}: the folder is not empty and is "
                         f"not a tensorslim checkpoint (no {META} with format {FORMAT_MARKER!r}); "
                         f"choose a new or empty folder")
    if entries and not overwrite:
        raise ValueError(f"{path} already holds a tensorslim checkpoint; pass overwrite=True "
                         f"(--overwrite) to replace it, or choose a new folder")
    foreign = [e for e in entries if not _own_entry(e)]
    if foreign:
        raise ValueError(f"refusing to replace the checkpoint {path}: it also holds {foreign[:5]}, "
                         f"which tensorslim did not write; move them out first")
    check_writable(path.parent, path)  # the swap renames in the parent folder
    return path


def save(model: nn.Module, plan: CompressionPlan, path: str | os.PathLike, *,
         extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s tensors, ``plan`` and metadata into the folder ``path`` atomically.

    ``plan`` is the :class:`CompressionPlan` that compressed the model (it is replayed by
    :func:`load`; for an uncompressed model pass ``CompressionPlan(layers=(), method="keep")``).
    ``path`` must be new, an empty folder, or (with ``overwrite=True``) a tensorslim checkpoint.
    A model fused by ``tensorslim.fuse`` is saved with a copy of ``plan`` that records the
    folded BatchNorms (``plan.fused``), so :func:`load` rebuilds the fused structure.
    The base architecture is recorded when the model came from ``tensorslim.models.create``
    (``model.tensorslim_arch``), so :func:`load` can rebuild it without the user's code.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"save: plan must be a tensorslim CompressionPlan (the plan that compressed "
                        f"the model; CompressionPlan(layers=(), method='keep') for an uncompressed "
                        f"one), got {type(plan).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save: extra must be a dict or None, got {type(extra).__name__}")
    plan = _with_fusion(model, plan)
    shown, path = Path(path), check_save_target(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.ts-tmp-{os.getpid()}-"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_dedup_shared(state), str(tmp / WEIGHTS))
        meta = {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION,
                "arch": getattr(model, "tensorslim_arch", None), "extra": extra or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        plan.save(tmp / PLAN)
        with folder_lock(path.parent):
            clean_stale_temps(path)
            _check_target(path, overwrite)  # another process may have saved meanwhile
            swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shown


def _with_fusion(model: nn.Module, plan: CompressionPlan) -> CompressionPlan:
    """``plan`` recording the BatchNorms ``tensorslim.fuse`` folded into ``model`` (the
    model's record wins over the plan's); ValueError if a recorded BatchNorm is still one."""
    from .fusion import fused_record

    fused = fused_record(model) or plan.fused
    modules = dict(model.named_modules())
    for f in fused:
        if not isinstance(modules.get(f.bn), nn.Identity):
            raise ValueError(f"save: the plan records BatchNorm {f.bn} as folded into {f.into}, but "
                             f"the model's {f.bn} is a {type(modules.get(f.bn)).__name__}; save the "
                             f"fused model (tensorslim.fuse) or a plan without 'fused'")
    return plan if fused == plan.fused else dataclasses.replace(plan, fused=fused)


_TEMP = re.compile(r"\.(?P<name>.+)\.ts-(?P<kind>tmp|old)-(?P<pid>\d+)-")
_LEGACY_TEMP = re.compile(r"\.(?P<name>.+)-[a-z0-9_]{8}$")


def clean_stale_temps(path: str | os.PathLike, *, legacy_age_s: float = 3600.0) -> list[Path]:
    """Remove the temporary folders of saves to ``path`` by processes that no longer run (and
    pid-less ones of older tensorslim versions, untouched for ``legacy_age_s`` and holding only
    checkpoint files). A checkpoint renamed aside by a killed swap is put back when ``path``
    is missing. Returns the removed folders."""
    path = Path(os.path.abspath(path))
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = _TEMP.match(entry.name)
            if m and m["name"] == path.name and entry.is_dir() and not pid_alive(int(m["pid"])):
                if m["kind"] == "old" and not path.exists() and is_checkpoint(entry):
                    os.replace(entry, path)
                    continue
            elif not (_legacy_temp(entry, path.name, legacy_age_s)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _legacy_temp(entry: Path, name: str, age_s: float) -> bool:
    m = _LEGACY_TEMP.match(entry.name)
    if not m or m["name"] != name or not entry.is_dir() or time.time() - entry.stat().st_mtime < age_s:
        return False
    return set(os.listdir(entry)) <= {WEIGHTS, META, PLAN}


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
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / META} is corrupt (not JSON text): {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / META} is corrupt: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format_version {meta.get('format_version')!r}; "
                         f"this tensorslim reads version {FORMAT_VERSION}")
    if meta.get("arch") is not None:
        from .models.checkpoint import check_arch

        check_arch(meta["arch"], path / META)
    if not isinstance(meta.get("extra", {}), dict):
        raise ValueError(f"{path / META}: 'extra' must be an object, got {meta['extra']!r:.100}")
    return meta


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        e = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(e, t.requires_grad) if isinstance(t, nn.Parameter) else e
    return copy.deepcopy(model, memo)


def _read_plan(path: Path) -> CompressionPlan | None:
    if not (path / PLAN).is_file():
        return None
    try:
        return CompressionPlan.load(path / PLAN)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / PLAN} is not a valid compression plan: {e}") from None


def _build(meta: dict[str, Any], model: nn.Module | None, plan: CompressionPlan | None,
           path: Path, progress: bool) -> nn.Module:
    """Build the model on the meta device, replay the plan, check it against the weights'
    header, and only then build it for real (a wrong meta.json allocates nothing)."""
    from .models.checkpoint import build_arch, check_arch
    from .surgery import compress

    if model is None:
        if not meta.get("arch"):
            raise ValueError(f"{path}: the checkpoint records no registry architecture; pass the "
                             f"uncompressed model instance as load(path, model=...)")
        name, kwargs = check_arch(meta["arch"], path / META)
    shapes = safetensors_shapes(path / WEIGHTS)

    def make(real: bool) -> nn.Module:
        if model is not None:
            return model if real else meta_copy(model)
        with contextlib.nullcontext() if real else torch.device("meta"):
            return build_arch(name, kwargs, path / META)

    fused = plan.fused if plan is not None else ()
    for real in (False, True):
        built = make(real)
        try:
            # BatchNorms folded before compression (into a layer of the type the plan then
            # compressed), the plan, then those folded into factorized or kept layers: the
            # order the saved model was made in, so the rebuilt structure (biases, a TT
            # layer's out_scale) is the saved one
            from .fusion import apply_folds
            planned = {s.name: s.layer_type for s in plan.compressed} if plan is not None else {}
            first = [f for f in fused if planned.get(f.into) == f.into_type]
            apply_folds(built, first)
            if plan is not None and (plan.layers or plan.edits):
                compress(built, plan, decompose=False, progress=progress and real)
            apply_folds(built, [f for f in fused if f not in first])
        except (ValueError, TypeError, KeyError) as e:
            what = "the model given" if model is not None else f"the architecture recorded in {META}"
            raise ValueError(f"{path / PLAN} does not fit {what}: {e}") from None
        if not real:
            check_shapes(built, shapes, str(path / WEIGHTS))
    return built


def load(path: str | os.PathLike, model: nn.Module | None = None, *, progress: bool = False) -> nn.Module:
    """Rebuild a (compressed) model from a checkpoint folder.

    ``model`` is the user's uncompressed architecture instance (any ``nn.Module``); when
    omitted, the base architecture recorded in the checkpoint is rebuilt from the registry.
    The plan is replayed (factorized layers of the right shapes; the BatchNorms it records
    as fused are folded again, ``tensorslim.fuse``, and the loaded model records them) and
    all tensors are loaded;
    every key and shape must match, which is checked against the weights file's header on
    the meta device before anything real is built.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS}")
    model = _build(meta, model, _read_plan(path), path, progress)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is truncated or corrupt: {e}") from None
    load_state_checked(model, state, str(path / WEIGHTS))
    return model

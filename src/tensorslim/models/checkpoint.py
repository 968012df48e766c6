"""Trained dense models: ``{name}.safetensors`` (state dict) + ``{name}.json`` (arch record +
training record), several names side by side in one folder.

The JSON's ``"arch"`` is the ``model.tensorslim_arch`` record set by
:func:`tensorslim.models.create`, so :func:`load_checkpoint` can rebuild the model without
pickles; its other keys are the training record (seed, epochs, test accuracy, ...) that
:func:`pretrained_info` gives. Weights shipped with the package live in ``tensorslim/weights/``
in this format.

Why a second format next to :mod:`tensorslim.io`'s checkpoint folders: an ``io`` folder
(``model.safetensors`` + ``plan.json`` + ``meta.json``) holds ONE *compressed* model and the
plan that rebuilds its factorized layers, is replaced only as a whole folder, and may hold a
model of any architecture (``load(path, model=...)``). The files here hold a *dense registry
architecture* and how it was trained: no plan to replay, one flat pair of files per name so
that a folder (the package's ``weights/``, a ``train`` run's output) lists many models, and a
record that tools read without loading tensors. Both write through the same leaf helpers
(:mod:`tensorslim.files`: atomic writes and the writability check; :mod:`tensorslim.statedict`:
header shapes, key and shape checks) and share the architecture record (:func:`check_arch`,
:func:`build_arch`, used by ``io`` too).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tensorslim.files import atomic_write, check_writable, write_text_atomic
from tensorslim.statedict import check_shapes, load_state_checked, load_state_dict_file, safetensors_shapes
from tensorslim.models.registry import create

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PathLike = str | os.PathLike[str]


def save_checkpoint(model: nn.Module, out_dir: PathLike, name: str,
                    meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/{name}.safetensors`` and ``out_dir/{name}.json`` (``{"arch", **meta}``).

    ``model`` must carry a ``tensorslim_arch`` record (built by ``create``). Returns both paths.
    """
    from safetensors.torch import save_file

    arch = getattr(model, "tensorslim_arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"model {type(model).__name__} has no tensorslim_arch record; "
                         "build it with tensorslim.models.create")
    out = check_checkpoint_target(out_dir, name)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights, info = out / f"{name}.safetensors", out / f"{name}.json"
    text = json.dumps({"arch": arch, **(meta or {})}, indent=2) + "\n"
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"arch": json.dumps(arch)}))
    write_text_atomic(info, text)
    return weights, info


def check_checkpoint_target(out_dir: PathLike, name: str) -> Path:
    """Raise unless :func:`save_checkpoint` may write ``{name}.safetensors`` / ``{name}.json``
    into ``out_dir``: it replaces them only when the JSON is a checkpoint record (an object
    with an ``"arch"``), never someone else's files of those names."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a new or existing folder")
    weights, info = out / f"{name}.safetensors", out / f"{name}.json"
    ours = False
    if info.is_file():
        try:
            ours = "arch" in json.loads(info.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
    clash = [p.name for p in (weights, info) if p.exists() or p.is_symlink()]
    if clash and not ours:
        raise ValueError(f"refusing to replace {clash} in {out}: they are not a tensorslim model "
                         f"checkpoint ({info.name} with an 'arch' record); choose another folder")
    check_writable(out, out)
    return out


def check_arch(arch: Any, source: PathLike) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of an architecture record ``{"name": str, "kwargs": {str: ...}}``."""
    if (not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str)
            or not isinstance(arch.get("kwargs", {}), Mapping)
            or not all(isinstance(k, str) for k in arch.get("kwargs", {}))):
        raise ValueError(f"{source}: 'arch' must be an object {{\"name\": str, \"kwargs\": {{...}}}}, "
                         f"got {arch!r:.200}")
    return arch["name"], dict(arch.get("kwargs", {}))


def build_arch(name: str, kwargs: dict[str, Any], source: PathLike) -> nn.Module:
    """``create(name, **kwargs)`` (on the current default device), a wrong record as a
    ValueError naming ``source``."""
    try:
        return create(name, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source}: cannot build architecture {name!r}: {e}") from None


def available_pretrained(weights_dir: PathLike | None = None) -> list[str]:
    """Names with both ``{name}.safetensors`` and ``{name}.json`` in ``weights_dir``."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.safetensors") if p.with_suffix(".json").is_file())


def checkpoint_info(name: str, directory: PathLike | None = None) -> dict[str, Any]:
    """The JSON record of checkpoint ``name`` (arch, seed, epochs, test accuracy, ...)."""
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    path = d / f"{name}.json"
    if not path.is_file() or not path.with_suffix(".safetensors").is_file():
        raise ValueError(f"no checkpoint named {name!r} in {d} (need {name}.safetensors and "
                         f"{name}.json); available: {available_pretrained(d)}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt (not JSON text): {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object, got {type(info).__name__}")
    return info


def load_checkpoint(name: str, directory: PathLike | None = None) -> nn.Module:
    """Rebuild model ``name`` from ``directory`` (default: the shipped weights), in eval mode.
    The architecture is built on the meta device and checked against the weights' header
    before it is built for real."""
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    info = checkpoint_info(name, d)
    arch_name, kwargs = check_arch(info.get("arch"), d / f"{name}.json")
    path = d / f"{name}.safetensors"
    shapes = safetensors_shapes(path)
    with torch.device("meta"):  # nothing real is built for a record that does not fit
        check_shapes(build_arch(arch_name, kwargs, d / f"{name}.json"), shapes, str(path))
    model = build_arch(arch_name, kwargs, d / f"{name}.json")
    load_state_checked(model, load_state_dict_file(path), str(path))
    return model.eval()


def load_pretrained(name: str) -> nn.Module:
    """A model shipped with the package (see :func:`available_pretrained`), in eval mode."""
    return load_checkpoint(name, WEIGHTS_DIR)


def pretrained_info(name: str) -> dict[str, Any]:
    """The JSON record of a model shipped with the package (arch, epochs, test accuracy, ...)."""
    return checkpoint_info(name, WEIGHTS_DIR)

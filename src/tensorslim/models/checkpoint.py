"""Model checkpoints: ``{name}.safetensors`` (state dict) + ``{name}.json`` (arch record + metadata).

The JSON's ``"arch"`` is the ``model.tensorslim_arch`` record set by
:func:`tensorslim.models.create`, so :func:`load_checkpoint` can rebuild the model without
pickles. Weights shipped with the package live in ``tensorslim/weights/``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.io import atomic_write, load_state_checked
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights, info = out / f"{name}.safetensors", out / f"{name}.json"
    text = json.dumps({"arch": arch, **(meta or {})}, indent=2) + "\n"
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"arch": json.dumps(arch)}))
    atomic_write(info, lambda tmp: Path(tmp).write_text(text))
    return weights, info


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
    return json.loads(path.read_text())


def load_checkpoint(name: str, directory: PathLike | None = None) -> nn.Module:
    """Rebuild model ``name`` from ``directory`` (default: the shipped weights), in eval mode."""
    from safetensors.torch import load_file

    d = Path(directory) if directory is not None else WEIGHTS_DIR
    info = checkpoint_info(name, d)
    arch = info.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"{d / name}.json has no valid 'arch' record: {arch!r}")
    model = create(arch["name"], **arch.get("kwargs", {}))
    path = d / f"{name}.safetensors"
    load_state_checked(model, load_file(str(path)), str(path))
    return model.eval()


def load_pretrained(name: str) -> nn.Module:
    """A model shipped with the package (see :func:`available_pretrained`), in eval mode."""
    return load_checkpoint(name, WEIGHTS_DIR)


def pretrained_info(name: str) -> dict[str, Any]:
    """The JSON record of a model shipped with the package (arch, epochs, test accuracy, ...)."""
    return checkpoint_info(name, WEIGHTS_DIR)

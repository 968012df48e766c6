"""State dicts on disk (a leaf module: torch, safetensors and the standard library only):
read a ``.safetensors`` / ``.pt`` state dict without unpickling code, read tensor shapes from
a safetensors header, and check every key and shape before loading into a model."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

_MAX_HEADER = 100 * 2**20


def safetensors_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header (reads the header only)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{file} is truncated or corrupt: not a safetensors file ({size} bytes"
                             + (f", header length {n})" if n >= 0 else ", too short for a header)"))
        raw = f.read(n)
    try:
        header = json.loads(raw)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"{file} is truncated or corrupt: its header is not a safetensors tensor table") from None
    return shapes


def check_shapes(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Every key and shape of ``model.state_dict()`` (may be on the meta device) must match."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    extra = sorted(set(shapes) - set(own))
    bad = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
    if missing or extra or bad:
        raise ValueError(f"{source} does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {extra[:10]}, shape mismatches {bad[:10]}")


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape, with a clear error."""
    check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth`` file (never unpickles code).
    A file that is not one is a ValueError naming it."""
    import pickle

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        safetensors_shapes(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is truncated or corrupt: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as e:
        why = ("it holds pickled objects other than tensors (a whole module?); save "
               "model.state_dict() instead" if isinstance(e, pickle.UnpicklingError)
               else re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip() or type(e).__name__).splitlines()[0]))
        raise ValueError(f"{path} is not a state dict torch.load(weights_only=True) can read "
                         f"(tensorslim never unpickles code): {why}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (got {type(obj).__name__})")
    return obj

"""Where a model and its Fashion-MNIST data come from, for the command line and the demo.

A model comes from a registry name with the shipped weights, a registry name plus a weights
file (``--weights``), or a checkpoint folder (``--checkpoint``: a ``tensorslim.save`` folder
or a ``tensorslim train`` output folder). Its input size (28 or 32 pixels, one channel) is
the one recorded with the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Source:
    """Where a model comes from: exactly one of ``checkpoint`` or ``model`` (with optional
    ``weights``). ``width`` builds a registry model for a bare state dict (default 1.0);
    ``pad_to_32`` overrides the input size recorded with the weights (28 or 32 pixels)."""

    model: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    width: float | None = None
    pad_to_32: bool | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError(f"--weights goes with --model NAME, not with --checkpoint DIR "
                             f"(got weights={self.weights!r}, checkpoint={self.checkpoint!r})")
        if self.checkpoint is None and self.model is None and self.weights is None:
            raise ValueError("no model given: pass --model NAME (registry, shipped weights or "
                             "--weights PATH) or --checkpoint DIR")


@dataclass
class Loaded:
    """A loaded model (eval mode), a description, and the input size it expects."""

    model: nn.Module
    description: str
    pad_to_32: bool

    @property
    def size(self) -> int:
        return 32 if self.pad_to_32 else 28

    def example(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 1, self.size, self.size, generator=torch.Generator().manual_seed(seed))


def _pad(info: Mapping[str, Any] | None) -> bool:
    inp = (info or {}).get("input") or {}
    return bool(inp.get("pad_to_32", False)) if isinstance(inp, Mapping) else False


def load_source(src: Source) -> Loaded:
    """Load the model ``src`` names (raises FileNotFoundError / ValueError with the fix)."""
    try:
        if src.checkpoint is not None:
            loaded = _from_checkpoint(Path(src.checkpoint), src.model)
        elif src.weights is not None:
            loaded = _from_weights(Path(src.weights), src.model, src.width)
        else:
            loaded = _from_registry(src.model)  # type: ignore[arg-type]
    except (ValueError, OSError) as e:  # name the argument (same exception type)
        flag = "--checkpoint" if src.checkpoint is not None else "--weights" if src.weights else "--model"
        kind = next(k for k in (FileNotFoundError, PermissionError, ValueError, OSError) if isinstance(e, k))
        raise kind(f"{flag}: {e}") from None
    if src.pad_to_32 is not None:
        loaded.pad_to_32 = src.pad_to_32
    loaded.model.eval()
    return loaded


def _from_registry(name: str) -> Loaded:
    from ..models import available_pretrained, list_models, load_pretrained, pretrained_info

    if name not in list_models() and name not in available_pretrained():
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}; shipped "
                         f"weights: {', '.join(available_pretrained()) or 'none'}")
    if name not in available_pretrained():
        raise ValueError(f"no shipped weights for {name!r} (shipped: {available_pretrained() or 'none'}); "
                         f"pass --weights PATH, --checkpoint DIR, or train one with `tensorslim train`")
    return Loaded(load_pretrained(name), f"{name}, shipped weights", _pad(pretrained_info(name)))


def _from_weights(path: Path, name: str | None, width: float | None) -> Loaded:
    from ..io import load_state_checked, load_state_dict_file
    from ..models import checkpoint_info, create, list_models, load_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    record = path.with_suffix(".json")
    if path.suffix == ".safetensors" and record.is_file():
        info = checkpoint_info(path.stem, path.parent)
        arch = (info.get("arch") if isinstance(info.get("arch"), dict) else {}).get("name")
        if name is not None and arch != name:
            raise ValueError(f"{path} holds a {arch!r} model ({record}), not {name!r}")
        return Loaded(load_checkpoint(path.stem, path.parent), f"{arch}, weights {path}", _pad(info))
    if name is None:
        raise ValueError(f"{path} has no {record.name} record of its architecture; also give "
                         f"--model NAME (known: {', '.join(list_models())}) and --width")
    model = create(name, width=1.0 if width is None else width)
    load_state_checked(model, load_state_dict_file(path), str(path))
    return Loaded(model, f"{name} (width {width or 1.0}), weights {path}", False)


def _from_checkpoint(path: Path, name: str | None) -> Loaded:
    from ..io import META, load, read_meta
    from ..models import available_pretrained, checkpoint_info, load_checkpoint

    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if (path / META).is_file():
        meta = read_meta(path)
        return Loaded(load(path), f"checkpoint {path}", _pad(meta.get("extra")))
    names = available_pretrained(path)
    if name in names or (name is None and len(names) == 1):
        pick = name or names[0]
        return Loaded(load_checkpoint(pick, path), f"{pick}, weights {path / pick}.safetensors",
                      _pad(checkpoint_info(pick, path)))
    raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no {META} (tensorslim.save) "
                            f"and no single NAME.safetensors + NAME.json pair (found: {names or 'none'})")


def test_loader(pad_to_32: bool, subset: int | None, batch_size: int = 500) -> Any:
    """The official Fashion-MNIST test set (first ``subset`` images when given)."""
    from ..data import FashionMNIST, TensorBatchLoader, Transform, load_fashion_mnist

    if subset is not None and (not isinstance(subset, int) or not 1 <= subset <= 10000):
        raise ValueError(f"test subset must be an int in [1, 10000], got {subset!r}")
    images, labels = load_fashion_mnist("test")
    ds = FashionMNIST("test", transform=Transform(pad_to_32=pad_to_32), images=images, labels=labels)
    if subset is not None:
        ds = ds.subset(torch.arange(subset))
    return TensorBatchLoader(ds, batch_size)


def train_loader(pad_to_32: bool, batch_size: int, seed: int) -> Any:
    """Augmented Fashion-MNIST training batches (the seeded 55k split, validation held out)."""
    from ..data import make_loaders

    return make_loaders(batch_size, seed=seed, augment=True, pad_to_32=pad_to_32).train


def validation_evaluator(pad_to_32: bool, subset: int, seed: int = 0) -> Any:
    """``evaluate(model) -> accuracy`` on the first ``subset`` images of the seeded validation
    split (held out of training; for ``rank_rule="accuracy_drop"``)."""
    from ..data import FashionMNIST, TensorBatchLoader, Transform, load_fashion_mnist, split_indices
    from ..train import evaluate

    if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= 5000:
        raise ValueError(f"validation subset must be an int in [1, 5000], got {subset!r}")
    images, labels = load_fashion_mnist("train")
    ds = FashionMNIST("train", transform=Transform(pad_to_32=pad_to_32), images=images, labels=labels)
    _, val_idx = split_indices(len(ds), 5000, seed)
    loader = TensorBatchLoader(ds.subset(val_idx[:subset]), 500)

    def validation_accuracy(model: nn.Module) -> float:
        return float(evaluate(model, loader)["accuracy"])

    return validation_accuracy

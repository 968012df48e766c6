"""In-memory Fashion-MNIST datasets and fast batch iterators (CPU or GPU, DDP-shardable).

Images stay uint8 in memory; each batch is converted to float, normalised, optionally
padded to 32x32 and augmented (random crop + horizontal flip) as one batched tensor op.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tensorslim.data.fashion_mnist import MEAN, STD, load_fashion_mnist


@dataclass(frozen=True)
class Transform:
    """How uint8 images become network inputs.

    ``pad_to_32`` adds 2 background pixels on each side (28x28 -> 32x32). ``crop_pad`` > 0
    enables random crops from an image zero-padded by that many pixels; ``flip`` enables
    random horizontal flips. ``mean``/``std`` normalise pixels scaled to [0, 1].
    """

    mean: float = MEAN
    std: float = STD
    pad_to_32: bool = False
    crop_pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"Transform.std must be > 0, got {self.std}")
        if not 0 <= self.crop_pad <= 8:
            raise ValueError(f"Transform.crop_pad must be in [0, 8] pixels, got {self.crop_pad}")

    @property
    def augments(self) -> bool:
        return self.crop_pad > 0 or self.flip


def random_crop_flip(
    x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batched augmentation of ``x`` (B, C, H, W): random crop of the zero-padded image
    (offsets in [0, 2*crop_pad]) and a random horizontal flip with probability 1/2."""
    b, _, h, w = x.shape
    if crop_pad > 0:
        padded = F.pad(x, (crop_pad, crop_pad, crop_pad, crop_pad))
        off = torch.randint(0, 2 * crop_pad + 1, (2, b), generator=generator).to(x.device)
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    return x


def to_inputs(
    images: torch.Tensor, transform: Transform, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (B, 28, 28) or (B, 1, H, W) -> float32 (B, 1, H', W') network inputs."""
    x = images.to(torch.float32).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if transform.pad_to_32:
        ph, pw = max(0, 32 - x.shape[-2]), max(0, 32 - x.shape[-1])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    if transform.augments and generator is not None:
        x = random_crop_flip(x, transform.crop_pad, transform.flip, generator)
    return (x - transform.mean) / transform.std


class FashionMNIST(Dataset):
    """Fashion-MNIST as tensors in memory: ``ds[i] -> (x (1, H, W) float32, label int)``.

    Per-item access applies no augmentation (use :class:`TensorBatchLoader` to train);
    it exists for compatibility with ``torch.utils.data.DataLoader``.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        *,
        transform: Transform | None = None,
        download: bool = False,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        if images is None or labels is None:
            images, labels = load_fashion_mnist(split, root, download=download)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.split = split
        self.images = images
        self.labels = labels
        self.transform = transform or Transform()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_inputs(self.images[i: i + 1], self.transform)[0]
        return x, int(self.labels[i])

    def subset(self, indices: torch.Tensor) -> "FashionMNIST":
        """A new dataset holding only ``indices`` (int64 tensor) of this one."""
        return FashionMNIST(self.split, transform=self.transform,
                            images=self.images[indices], labels=self.labels[indices])


class TensorBatchLoader:
    """Iterates ``(x, y)`` batches straight from in-memory tensors.

    ``shuffle`` draws a new permutation every epoch from ``(seed, epoch)``, identical on all
    ranks; rank ``r`` of ``world_size`` takes every ``world_size``-th index, as
    ``DistributedSampler`` does (padded by wrap-around when ``drop_last`` is False so that
    every rank gets the same number of batches). Call :meth:`set_epoch` (or just iterate
    again: the epoch counter advances by itself) for a new order.
    """

    def __init__(
        self,
        dataset: FashionMNIST,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(dataset) == 0:
            raise ValueError("cannot build a loader over an empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.even_shards = even_shards
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def shard(self, rank: int, world_size: int, *, even: bool = True) -> "TensorBatchLoader":
        """A copy of this loader that yields only rank ``rank``'s share of each epoch.

        ``even=True`` pads (or, with ``drop_last``, trims) so all ranks get the same number of
        samples, as training needs; ``even=False`` splits exactly (for evaluation).
        """
        out = TensorBatchLoader(
            self.dataset, self.batch_size, shuffle=self.shuffle, augment=self.augment,
            drop_last=self.drop_last, seed=self.seed, rank=rank, world_size=world_size,
            even_shards=even, device=self.device,
        )
        out.epoch = self.epoch
        return out

    def to(self, device: torch.device | str) -> "TensorBatchLoader":
        """A copy of this loader whose batches are moved to ``device``."""
        out = self.shard(self.rank, self.world_size, even=self.even_shards)
        out.device = torch.device(device)
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_samples(self) -> int:
        n = len(self.dataset)
        if not self.even_shards:
            return len(range(self.rank, n, self.world_size))
        if self.drop_last:
            return n // self.world_size
        return math.ceil(n / self.world_size)

    def __len__(self) -> int:
        per_rank = self._num_samples()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (int64)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if not self.even_shards:
            return order[self.rank:: self.world_size]
        total = self._num_samples() * self.world_size
        if total > n:
            order = torch.cat([order, order[: total - n]])
        return order[:total][self.rank:: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        gen = None
        if self.augment:
            gen = torch.Generator().manual_seed(
                (self.seed * 100_003 + self.epoch) * 1009 + self.rank + 7)
        tf = self.dataset.transform
        if not self.augment:
            tf = replace(tf, crop_pad=0, flip=False)
        self.epoch += 1
        for b in range(len(self)):
            sel = idx[b * self.batch_size: (b + 1) * self.batch_size]
            x = to_inputs(self.dataset.images[sel], tf, gen)
            y = self.dataset.labels[sel]
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y


class Loaders(tuple):
    """``(train, val, test)`` loaders; ``val`` is None when ``val_size == 0``."""

    __slots__ = ()

    def __new__(cls, train: TensorBatchLoader, val: TensorBatchLoader | None,
                test: TensorBatchLoader) -> "Loaders":
        return super().__new__(cls, (train, val, test))

    @property
    def train(self) -> TensorBatchLoader:
        return self[0]

    @property
    def val(self) -> TensorBatchLoader | None:
        return self[1]

    @property
    def test(self) -> TensorBatchLoader:
        return self[2]


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(train_idx, val_idx)`` partition of ``range(n)`` (same seed, same split)."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def make_loaders(
    batch_size: int,
    val_size: int = 5000,
    seed: int = 0,
    augment: bool = True,
    pad_to_32: bool = False,
    root: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    *,
    crop_pad: int = 2,
    eval_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    download: bool = False,
) -> Loaders:
    """Train / validation / test loaders over Fashion-MNIST.

    The 60,000 official training images are split by ``seed`` into ``60000 - val_size``
    training and ``val_size`` validation images; ``test`` is the official 10,000-image test
    set (use it for final numbers only). ``subset`` keeps only the first ``subset`` training
    images of the seeded order (validation and test are unchanged). Training batches are
    shuffled every epoch and, with ``augment``, randomly cropped (``crop_pad`` pixels) and
    flipped. Inputs are ``(B, 1, 28, 28)``, or ``(B, 1, 32, 32)`` with ``pad_to_32``.
    """
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    images, labels = load_fashion_mnist("train", root, download=download)
    test_images, test_labels = load_fashion_mnist("test", root, download=download)
    tf = Transform(pad_to_32=pad_to_32, crop_pad=crop_pad if augment else 0, flip=augment)
    full = FashionMNIST("train", transform=tf, images=images, labels=labels)
    train_idx, val_idx = split_indices(len(full), val_size, seed)
    if subset is not None:
        if subset > len(train_idx):
            raise ValueError(f"subset={subset} exceeds the {len(train_idx)} training images")
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))
        train_idx = train_idx[order[:subset]].sort().values
    eval_bs = eval_batch_size or max(batch_size, 256)
    common = dict(rank=rank, world_size=world_size, device=device)
    train = TensorBatchLoader(full.subset(train_idx), batch_size, shuffle=True, augment=augment,
                              drop_last=True, seed=seed, **common)
    val = None
    if val_size > 0:
        val = TensorBatchLoader(full.subset(val_idx), eval_bs, **common)
    test_ds = FashionMNIST("test", transform=tf, images=test_images, labels=test_labels)
    test = TensorBatchLoader(test_ds, eval_bs, **common)
    return Loaders(train, val, test)

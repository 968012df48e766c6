"""Deterministic splits, batched augmentation and DDP-style sharding of the in-memory loaders."""
from __future__ import annotations

import pytest
import torch

from tensorslim.data import (
    FashionMNIST,
    TensorBatchLoader,
    Transform,
    make_loaders,
    random_crop_flip,
    split_indices,
    to_inputs,
)
from tensorslim.data import fashion_mnist as fm

needs_data = pytest.mark.skipif(
    not (fm.SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist")


def _toy(n: int = 50, transform: Transform | None = None) -> FashionMNIST:
    images = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8)
    return FashionMNIST(images=images.reshape(n, 28, 28), labels=torch.arange(n) % 10,
                        transform=transform)


def test_split_is_deterministic_and_a_partition() -> None:
    train_a, val_a = split_indices(60000, 5000, seed=0)
    train_b, val_b = split_indices(60000, 5000, seed=0)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert len(train_a) == 55000 and len(val_a) == 5000
    assert torch.equal(torch.cat([train_a, val_a]).sort().values, torch.arange(60000))
    _, val_c = split_indices(60000, 5000, seed=1)
    assert not torch.equal(val_a, val_c)
    with pytest.raises(ValueError, match="val_size"):
        split_indices(100, 100, seed=0)


@needs_data
def test_make_loaders_shapes_and_split() -> None:
    a = make_loaders(128, seed=3, pad_to_32=True)
    b = make_loaders(128, seed=3, augment=False, subset=1000)
    assert len(a.train.dataset) == 55000 and len(a.val.dataset) == 5000
    assert len(a.test.dataset) == 10000 and len(a.train) == 55000 // 128
    assert torch.equal(a.val.dataset.images, b.val.dataset.images)  # same seed, same split
    assert len(b.train.dataset) == 1000
    x, y = next(iter(a.train))
    assert x.shape == (128, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = next(iter(b.test))
    assert x.shape == (256, 1, 28, 28)
    # normalised inputs: mean ~0, std ~1 over the (unaugmented) validation set
    xs = torch.cat([xb for xb, _ in b.val])
    assert abs(xs.mean().item()) < 0.02 and abs(xs.std().item() - 1) < 0.02


def test_transform_validation() -> None:
    with pytest.raises(ValueError, match="crop_pad"):
        Transform(crop_pad=20)
    with pytest.raises(ValueError, match="std"):
        Transform(std=0.0)


def test_pad_to_32_border_is_background() -> None:
    imgs = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x = to_inputs(imgs, Transform(pad_to_32=True))
    assert x.shape == (2, 1, 32, 32)
    background = (0 - fm.MEAN) / fm.STD
    assert torch.allclose(x[:, :, :2, :], torch.tensor(background))
    assert torch.allclose(x[:, :, 2:30, 2:30], torch.tensor((1 - fm.MEAN) / fm.STD))


def test_random_crop_is_a_shifted_window() -> None:
    x = torch.rand(16, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, crop_pad=3, flip=False, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(16):
        windows = [padded[i, :, r:r + 28, c:c + 28] for r in range(7) for c in range(7)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)


def test_flip_flips_about_half() -> None:
    x = torch.rand(400, 1, 32, 32)
    out = random_crop_flip(x, crop_pad=0, flip=True, generator=torch.Generator().manual_seed(1))
    same = [torch.equal(out[i], x[i]) for i in range(400)]
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(400)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 150 < sum(flipped) < 250


def test_epoch_order_is_seeded() -> None:
    loader = TensorBatchLoader(_toy(), 7, shuffle=True, seed=5)
    loader.set_epoch(0)
    first = loader.indices()
    loader.set_epoch(1)
    second = loader.indices()
    loader.set_epoch(0)
    assert torch.equal(loader.indices(), first) and not torch.equal(first, second)
    ys = torch.cat([y for _, y in loader])  # iteration advances the epoch itself
    assert len(ys) == 50 and len(loader) == 8


def test_shards_cover_the_data() -> None:
    base = TensorBatchLoader(_toy(), 4, shuffle=True, seed=0)
    even = [base.shard(r, 3) for r in range(3)]
    assert [len(s.indices()) for s in even] == [17, 17, 17]  # padded like DistributedSampler
    assert set(torch.cat([s.indices() for s in even]).tolist()) == set(range(50))
    exact = [base.shard(r, 3, even=False) for r in range(3)]
    got = torch.cat([s.indices() for s in exact]).sort().values
    assert torch.equal(got, torch.arange(50))  # each sample exactly once (evaluation)
    assert len(exact[0]) == 5 and len(exact[2]) == 4
    with pytest.raises(ValueError, match="rank"):
        base.shard(3, 3)


def test_augmented_loader_keeps_shapes_and_labels() -> None:
    ds = _toy(transform=Transform(crop_pad=4, flip=True, pad_to_32=True))
    loader = TensorBatchLoader(ds, 16, shuffle=True, augment=True, drop_last=True)
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape == (16, 1, 32, 32) for x, _ in batches)
    plain = TensorBatchLoader(ds, 50)
    x, y = next(iter(plain))
    assert torch.equal(y, torch.arange(50) % 10)
    assert torch.equal(x, to_inputs(ds.images, Transform(pad_to_32=True)))  # eval: no augmentation


def test_loader_argument_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatchLoader(_toy(), 0)
    with pytest.raises(ValueError, match="subset"):
        make_loaders(32, subset=0)

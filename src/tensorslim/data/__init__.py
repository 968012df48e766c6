"""Real datasets: Fashion-MNIST from its official IDX files, and fast in-memory loaders.

    images, labels = ts.data.load_fashion_mnist("train")      # uint8 (60000, 28, 28), int64
    train, val, test = ts.data.make_loaders(batch_size=128, pad_to_32=True)
"""
from __future__ import annotations

from tensorslim.data.fashion_mnist import (
    CLASSES,
    MD5_GZ,
    MD5_RAW,
    MEAN,
    STD,
    DataIntegrityError,
    candidate_dirs,
    load_fashion_mnist,
    parse_idx,
)
from tensorslim.data.loaders import (
    FashionMNIST,
    Loaders,
    TensorBatchLoader,
    Transform,
    make_loaders,
    random_crop_flip,
    split_indices,
    to_inputs,
)

__all__ = [
    "CLASSES", "MD5_GZ", "MD5_RAW", "MEAN", "STD", "DataIntegrityError", "candidate_dirs",
    "load_fashion_mnist", "parse_idx", "FashionMNIST", "Loaders", "TensorBatchLoader",
    "Transform", "make_loaders", "random_crop_flip", "split_indices", "to_inputs",
]

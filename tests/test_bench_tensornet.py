"""The TensorNet benchmark at CI size (issue 19): the two-layer FC net whose 784 -> 625 hidden
layer is a TT layer (modes [7,4,7,4] x [5,5,5,5], TT-rank 4, t3f's Glorot init) trains from
scratch on real Fashion-MNIST (6,000 training images, one epoch, AdamW) and beats a floor on
the official 10,000 test images. The one real end-to-end training test of issue 19."""
import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers import TTLinear
from tensorslim.train import evaluate, train

FLOOR = 0.70  # measured 0.776 on this setting; chance is 0.10


@pytest.fixture(scope="module")
def loaders():
    try:
        return ts.data.make_loaders(64, val_size=0, augment=False, subset=6000)
    except FileNotFoundError as e:  # the IDX files are not on this machine
        pytest.skip(f"Fashion-MNIST not available: {e}")


def test_tensornet_fc_trains_above_the_floor(loaders):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hidden = TTLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), 4, init="glorot")
        model = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Linear(625, 10))
        assert sum(p.numel() for p in hidden.parameters()) == 1725  # t3f's count: 1,100 core weights + 625 bias
        train(model, loaders.train, epochs=1, optimizer="adamw", lr=3e-3, weight_decay=0.0, progress=False)
        acc = evaluate(model, loaders.test)["accuracy"]
    finally:
        torch.set_num_threads(threads)
    assert acc > FLOOR, acc

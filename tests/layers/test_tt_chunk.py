"""TTConv2d runs large eager inference batches in slices (issue 19: under glibc's allocator the
whole-batch contraction state is returned to the kernel on every free): the sliced output equals
the whole-batch one, the slice size follows ``chunk_bytes``, and nothing is sliced when a graph
is needed, while tracing, or when turned off."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tensorslim.layers import TTConv2d
from tensorslim.layers import _ttconv_fast
from tensorslim.layers._ttconv_fast import CHUNK_BYTES, auto_chunk_bytes, batch_chunk

from test_tt_cache import CASES, _reference  # tests/layers is on sys.path (rootdir-relative imports)


def _layer(name, batch, seed=0, frozen=False):
    cfg, rank, shape = CASES[name]
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 12, **cfg).double()
    layer = TTConv2d.from_conv(conv, rank, d=2).eval().requires_grad_(not frozen)
    return layer, torch.randn(batch, *shape, dtype=torch.float64)


def _whole(layer, x):
    ref = copy.deepcopy(layer)
    ref.chunk_bytes = 0
    with torch.no_grad():
        return ref(x)


def _state_bytes(layer, x):
    """The largest contraction state of one sample, in bytes: the outputs of every conv and bmm
    of a whole-batch run."""
    sizes = []

    def spy(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            sizes.append(out.numel() * out.element_size() // x.shape[0])
            return out
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", spy(torch.bmm))
        mp.setattr(torch.nn.functional, "conv2d", spy(torch.nn.functional.conv2d))
        _whole(layer, x)
    return max(sizes)


@pytest.mark.parametrize("name", ["small", "conv", "depthwise", "groups", "reflect", "same-even"])
def test_sliced_batch_equals_the_whole_batch_and_the_dense_conv(name):
    layer, x = _layer(name, 9)
    layer.chunk_bytes = 1  # one sample per slice
    with torch.no_grad():
        assert batch_chunk(layer, x) == 1
    calls = []
    contract = layer._contract
    layer._contract = lambda xc: calls.append(xc.shape[0]) or contract(xc)
    with torch.no_grad():
        y = layer(x)
    del layer._contract
    assert calls == [1] * 9
    assert_close(y, _whole(layer, x), rtol=1e-12, atol=1e-12)
    assert_close(y, _reference(layer, x), rtol=1e-10, atol=1e-10)
    assert y.is_contiguous()


def test_slice_size_follows_the_state_budget():
    layer, x = _layer("conv", 10, frozen=True)  # frozen: no graph needed even with grad on
    per = _state_bytes(layer, x)
    assert per > x[0].numel() * 8  # the state is wider than the input
    layer.chunk_bytes = 3 * per
    assert batch_chunk(layer, x) == 3  # 10 samples -> 4 slices of at most 3
    layer.chunk_bytes = 5 * per  # whole batch = 2 budgets: not sliced
    assert batch_chunk(layer, x) == 0
    layer.chunk_bytes = 4 * per  # 10 samples -> 3 slices of at most 4
    assert batch_chunk(layer, x) == 4
    assert batch_chunk(layer, x[:1]) == 0


def test_no_slicing_when_a_graph_is_needed_turned_off_or_traced():
    layer, x = _layer("conv", 6)
    layer.chunk_bytes = 1
    assert batch_chunk(layer, x) == 0  # trainable cores, grad on: training keeps one pass
    with torch.no_grad():
        assert batch_chunk(layer, x) == 1
    layer.requires_grad_(False)
    assert batch_chunk(layer, x) == 1
    assert batch_chunk(layer, x.requires_grad_()) == 0  # an input gradient: one pass too
    x = x.detach()
    layer.chunk_bytes = 0
    assert batch_chunk(layer, x) == 0
    layer.eager_cache = False
    layer.chunk_bytes = 1
    calls = []
    layer._batch_chunk = lambda xc: calls.append(1) or 1
    with torch.no_grad():
        layer(x)
    assert calls == []  # eager_cache = False turns slicing off with the cache
    del layer._batch_chunk
    layer.eager_cache = True
    with torch.no_grad():
        traced = torch.jit.trace(layer, x[:4])
        other = torch.randn(7, *x.shape[1:], dtype=x.dtype)
        assert_close(traced(other), _reference(layer, other), rtol=1e-10, atol=1e-10)  # no slices baked in


def test_auto_budget_follows_the_allocator(monkeypatch):
    layer, x = _layer("conv", 4)
    assert layer.chunk_bytes is None
    for name, budget in (("system", CHUNK_BYTES), ("tcmalloc", 0), ("jemalloc", 0)):
        monkeypatch.setattr(_ttconv_fast, "allocator", lambda name=name: name)
        auto_chunk_bytes.cache_clear()
        assert auto_chunk_bytes() == budget
    auto_chunk_bytes.cache_clear()
    monkeypatch.undo()
    auto_chunk_bytes.cache_clear()
    state = pickle.loads(pickle.dumps(layer)).__dict__
    assert state["chunk_bytes"] is None
    del layer.__dict__["chunk_bytes"]  # a layer pickled before slicing existed
    assert pickle.loads(pickle.dumps(layer)).chunk_bytes is None

"""TTConv2d's inference cache of the kernels it derives from its TT cores and its small-input
path (issue 19): the cached output equals the uncached one, every kind of weight change is
followed, nothing is cached in training, state_dict / deepcopy / pickle / trace are unaffected."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.layers import TTConv2d
from tensorslim.layers._ttconv_fast import CACHE, INDEX
from tensorslim.layers.ttconv import tt_conv_kernel

# (conv kwargs, TT-rank, input (S, H, W)): merged small path, merged conv path (many pixels),
# depthwise path (r_0 = 2, r_1 = 1 does not merge), grouped merged path, explicit padding
# (reflect; asymmetric zeros of an even 'same' kernel)
CASES = {
    "small": (dict(kernel_size=3, padding=1), (9, 3), (8, 4, 4)),
    "conv": (dict(kernel_size=3, padding=1), (9, 3), (8, 12, 11)),
    "depthwise": (dict(kernel_size=3, padding=1), (2, 1), (8, 5, 6)),
    "groups": (dict(kernel_size=3, padding=1, groups=2), (9, 2), (8, 4, 4)),
    "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect", stride=2), (9, 3), (8, 7, 7)),
    "same-even": (dict(kernel_size=(4, 2), padding="same", dilation=(1, 2)), (8, 3), (8, 3, 5)),
}
SMALL = ("small", "reflect", "same-even")  # these inputs take small_forward


def _layer(name, seed=0):
    cfg, rank, shape = CASES[name]
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 12, **cfg).double()
    layer = TTConv2d.from_conv(conv, rank, d=2).eval()
    return conv, layer, torch.randn(1, *shape, dtype=torch.float64)


def _reference(layer, x):
    """The dense conv of the layer's current kernel: what the output must be."""
    twin = nn.Conv2d(**layer.geometry.conv_kwargs()).to(x.dtype)
    with torch.no_grad():
        twin.weight.copy_(tt_conv_kernel(layer))
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
        return twin(x)


def _uncached(layer, x):
    ref = copy.deepcopy(layer)
    ref.eager_cache = False
    with torch.no_grad():
        return ref(x)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_output_equals_uncached_and_the_dense_conv(name):
    conv, layer, x = _layer(name)
    assert layer.merged == (name != "depthwise")
    builds = []
    build = layer._build_kernel
    layer._build_kernel = lambda merged: builds.append(merged) or build(merged)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    with torch.inference_mode():
        third = layer(x)
    del layer._build_kernel
    assert len(builds) == 1 and CACHE in layer.__dict__  # built once, then hits
    plan = layer.__dict__.get(INDEX)
    assert (plan is not None and plan[1] is not None) == (name in SMALL)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert_close(first, _uncached(layer, x), rtol=1e-12, atol=1e-12)
    assert_close(first, _reference(layer, x), rtol=1e-10, atol=1e-10)
    assert first.shape == conv(x).shape and first.is_contiguous()


def _sgd_step(layer, x):
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    loss = (layer(x) ** 2).sum()
    loss.backward()
    opt.step()
    layer.eval()


def _inplace(layer, x):
    with torch.no_grad():
        layer.spatial.mul_(1.5)


def _data_assign(layer, x):
    layer.cores[-1].data = torch.randn_like(layer.cores[-1])


def _data_inplace(layer, x):  # bypasses the version counter
    layer.cores[-1].data.mul_(-2.0)


def _load_state_dict(layer, x):  # copies into the existing parameters (in place)
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})


def _bias_inplace(layer, x):
    with torch.no_grad():
        layer.bias.add_(0.5)


CHANGES = [_sgd_step, _inplace, _data_assign, _data_inplace, _load_state_dict, _bias_inplace]


@pytest.mark.parametrize("name", ["small", "conv", "depthwise", "groups"])
def test_every_kind_of_weight_change_is_followed(name):
    _, layer, x = _layer(name)
    with torch.no_grad():
        layer(x)
    for change in CHANGES:
        with torch.no_grad():
            old = layer(x)
        change(layer, x)
        with torch.no_grad():
            new = layer(x)
        assert not torch.allclose(new, old), change.__name__
        assert_close(new, _reference(layer, x), rtol=1e-10, atol=1e-10, msg=change.__name__)


def test_dtype_moves_are_followed_and_free_the_cache():
    _, layer, x = _layer("small")
    with torch.no_grad():
        ref = layer(x)
        assert CACHE in layer.__dict__
        layer.float()
        assert CACHE not in layer.__dict__ and INDEX not in layer.__dict__
        out32 = layer(x.float())
        assert out32.dtype == torch.float32
        assert_close(out32, ref.float(), rtol=1e-5, atol=1e-5)
        layer.double()  # back from float32: the values lost their float64 digits
        assert_close(layer(x), _reference(layer, x), rtol=1e-10, atol=1e-10)
        assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_nothing_is_cached_in_training_and_gradients_are_right():
    conv, layer, x = _layer("small")
    with torch.no_grad():
        layer(x)  # a warm cache ...
    assert CACHE in layer.__dict__
    layer.train()
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert CACHE not in layer.__dict__  # ... dropped by the first forward that needs a graph
    out.square().sum().backward()
    twin = copy.deepcopy(layer)
    twin.eager_cache = False
    xt = x.clone().requires_grad_(True)
    twin.zero_grad()
    twin(xt).square().sum().backward()
    assert_close(xg.grad, xt.grad, rtol=1e-12, atol=1e-12)
    for p, q in zip(layer.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_frozen_cores_cache_built_in_inference_mode_serves_an_input_gradient():
    _, layer, x = _layer("conv")
    layer.requires_grad_(False)
    with torch.inference_mode():
        layer(x)  # built under inference mode
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()  # the cached kernel is saved for backward: not an inference tensor
    xr = x.clone().requires_grad_(True)
    twin = nn.Conv2d(**layer.geometry.conv_kwargs()).double()
    with torch.no_grad():
        twin.weight.copy_(tt_conv_kernel(layer))
        twin.bias.copy_(layer.bias)
    twin(xr).sum().backward()  # the dense conv's input gradient
    assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-10)


def test_state_dict_deepcopy_and_pickle_never_carry_the_cache():
    _, layer, x = _layer("small")
    keys = list(layer.state_dict())
    with torch.no_grad():
        ref = layer(x)
    assert CACHE in layer.__dict__ and INDEX in layer.__dict__
    assert list(layer.state_dict()) == keys == ["spatial", "bias", "cores.0", "cores.1"]
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert CACHE not in twin.__dict__ and INDEX not in twin.__dict__
        with torch.no_grad():
            assert torch.equal(twin(x), ref)
        with torch.no_grad():
            twin.spatial.zero_()  # the copy's parameters are its own
        with torch.no_grad():
            assert torch.equal(layer(x), ref)


def test_traced_graph_keeps_the_tt_structure_and_flops_match_the_plan():
    _, layer, x = _layer("small")
    with torch.no_grad():
        layer(x)  # a warm cache must not leak into the trace
        traced = torch.jit.trace(layer, (x,))
        with torch.no_grad():
            layer.spatial.mul_(0.5)  # traced modules share the parameters
        assert_close(traced(x), _reference(layer, x), rtol=1e-10, atol=1e-10)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        layer(x)
    assert fc.get_total_flops() == 2 * layer.macs(x.shape)


def test_small_path_follows_input_shape_changes():
    _, layer, _ = _layer("small")
    for shape in [(1, 8, 4, 4), (2, 8, 4, 4), (1, 8, 5, 3), (1, 8, 2, 2), (3, 8, 4, 4)]:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            assert_close(layer(x), _reference(layer, x), rtol=1e-10, atol=1e-10)
            xc = x.contiguous(memory_format=torch.channels_last)
            assert_close(layer(xc), _reference(layer, x), rtol=1e-10, atol=1e-10)


def test_folded_batchnorm_scale_on_the_small_path():
    _, layer, x = _layer("small")
    scale, shift = torch.rand(12, dtype=torch.float64) + 0.5, torch.randn(12, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        layer.fold_output_affine(scale, shift)
        assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
        assert_close(layer(x), _uncached(layer, x), rtol=1e-12, atol=1e-12)


def _onnx(layer, x, fold):
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17, do_constant_folding=fold)
    return buf.getvalue()


def test_onnx_export_after_a_warm_cache_holds_the_cores():
    """A warm cache changes nothing in the exported graph: the same nodes as a cold export,
    and without constant folding the TT cores themselves are the graph's initializers."""
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    _, layer, x = _layer("small")
    layer, x = layer.float(), x.float()
    cold = [n.op_type for n in onnx.load_from_string(_onnx(layer, x, True)).graph.node]
    with torch.no_grad():
        ref = layer(x)  # warm
    assert CACHE in layer.__dict__
    warm = onnx.load_from_string(_onnx(layer, x, True))
    assert [n.op_type for n in warm.graph.node] == cold
    raw = _onnx(layer, x, False)
    names = {init.name for init in onnx.load_from_string(raw).graph.initializer}
    assert {"spatial", "cores.0", "cores.1", "bias"} <= names
    for model in (warm.SerializeToString(), raw):
        (out,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
        assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-5)

"""Every layer class passes torch.jit.script, torch.jit.trace, torch.export and ONNX export."""
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from _layer_helpers import dense_embedding, is_embedding, token_input
from tensorslim.layers import LAYERS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_EXPORT_CFG = {
    # one plain and one explicit-pad (reflect, asymmetric 'same', grouped) geometry per dims
    2: [dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(4, 3), padding="same", padding_mode="reflect", groups=2),
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
        dict(kernel_size=(2, 4), padding="same")],  # asymmetric zeros
    1: [dict(kernel_size=3, padding=1),
        dict(kernel_size=4, padding="same", padding_mode="circular", groups=2)],
}
_RANK = {"cp": 8, "tucker": (4, 6), "svd": 4, "tt": 3, "filtercp": 2}


def _cases():
    for (method, dense), cls in LAYERS.items():
        if dense in (nn.Linear, nn.Embedding):  # Embedding: int64 token indices in, (*, D) out
            yield pytest.param(method, dense, {}, id=f"{cls.__name__}")
        else:
            dims = 2 if dense is nn.Conv2d else 1
            for i, cfg in enumerate(_EXPORT_CFG[dims]):
                yield pytest.param(method, dense, cfg, id=f"{cls.__name__}-{i}")


def _build(method, dense, cfg):
    torch.manual_seed(0)
    if dense is nn.Linear:
        mod = nn.Linear(24, 20)
        x = torch.randn(4, 24)
    elif is_embedding(dense):
        mod, x = dense_embedding(), token_input()
    else:
        mod = dense(8, 12, **cfg)
        x = torch.randn((2, 8, 10, 9) if dense is nn.Conv2d else (2, 8, 13))
    layer = LAYERS[(method, dense)].like(mod, _RANK[method]).eval()
    return layer, x


@pytest.mark.parametrize("method,dense,cfg", list(_cases()))
def test_script_trace_export(method, dense, cfg):
    layer, x = _build(method, dense, cfg)
    with torch.no_grad():
        ref = layer(x)
        scripted = torch.jit.script(layer)
        assert_close(scripted(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(layer, (x,))
        assert_close(traced(x), ref)
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert_close(exported.module()(x), ref)
        if is_embedding(dense):  # other token indices than the traced ones gather other rows
            other = (x + 5) % int(x.max() + 1)
            assert not torch.equal(layer(other), ref)
            for run in (scripted, traced, exported.module()):
                assert_close(run(other), layer(other))


@pytest.mark.parametrize("method,dense,cfg", list(_cases()))
def test_onnx_export_matches_onnxruntime(method, dense, cfg):
    ort = pytest.importorskip("onnxruntime")
    layer, x = _build(method, dense, cfg)
    if dense is nn.Conv2d:  # a pooling after it needs static shapes through the export
        layer = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad_by_slices_equals_f_pad(mode):
    from tensorslim.layers._conv import pad_by_slices

    x = torch.randn(2, 3, 6, 5)
    pad = [1, 2, 0, 3]
    assert_close(pad_by_slices(x, pad, mode), torch.nn.functional.pad(x, pad, mode=mode))

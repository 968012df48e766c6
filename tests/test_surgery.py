import copy

import numpy as np
import pytest
import torch
from _bounds import eckart_young, kernel, unfold_rank
from torch import nn

import tensorslim as ts


@pytest.fixture(params=["tucker", "cp", "svd", "auto"])
def compressed(request, small_cnn, image):
    dense = copy.deepcopy(small_cnn)
    plan = ts.make_plan(small_cnn, request.param, image, target_macs=0.4)
    model = ts.compress(small_cnn, plan, progress=False)
    return dense, model, plan


def test_compress_replaces_only_planned_layers(compressed, image):
    dense, model, plan = compressed
    names = {s.name for s in plan.compressed}
    assert names
    from tensorslim.layers import FactorizedLayer

    for name, mod in model.named_modules():
        if name in names:
            assert isinstance(mod, FactorizedLayer) and 0 <= mod.approx_error < 1
    for spec in plan.layers:
        if not spec.compressed:
            assert type(model.get_submodule(spec.name)) is type(dense.get_submodule(spec.name))
    out, ref = model(image), dense(image)
    assert out.shape == ref.shape
    # the compressed model IS the dense model with every planned weight replaced by its
    # rebuilt kernel W^ (so a zero, mis-padded or bias-less output fails), and each W^ is as
    # close to W as its rank allows: at least the Eckart-Young bound, equal to it for SVD
    rebuilt = copy.deepcopy(dense)
    with torch.no_grad():
        for spec in plan.compressed:
            w = dense.get_submodule(spec.name).weight.detach().double()
            w_hat = kernel(model.get_submodule(spec.name)).reshape(w.shape)
            rebuilt.get_submodule(spec.name).weight.copy_(w_hat)
            layer = model.get_submodule(spec.name)
            err = ts.tensor.rel_error(w, w_hat)
            assert err == pytest.approx(layer.approx_error, rel=1e-4, abs=1e-6), spec.name
            bound = eckart_young(w, getattr(dense.get_submodule(spec.name), "groups", 1),
                                 unfold_rank(layer.rank))
            assert err >= bound * (1 - 1e-5), (spec.name, err, bound)
            if layer.method == "svd":
                assert err == pytest.approx(bound, rel=1e-4), spec.name
    torch.testing.assert_close(out, rebuilt(image), rtol=1e-5, atol=1e-6)
    assert 0.0 < ts.tensor.rel_error(ref, out) < 1.0


def test_exact_low_rank_layers_are_reproduced(seq_net, sequence):
    dense = copy.deepcopy(seq_net).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make every weight exactly rank 8
        for mod in (dense.conv, dense.proj):
            w = mod.weight
            flat = torch.randn(w.shape[0], 8, generator=g, dtype=w.dtype) @ torch.randn(
                8, w[0].numel(), generator=g, dtype=w.dtype)
            w.copy_(flat.reshape(w.shape))
    plan = ts.make_plan(dense, "svd", sequence.double(), ranks=8)
    assert {s.name for s in plan.compressed} == {"conv", "proj"}  # 'out' (96->8) cannot save
    model = ts.compress(copy.deepcopy(dense), plan, progress=False)
    torch.testing.assert_close(model(sequence.double()), dense(sequence.double()), rtol=1e-9, atol=1e-9)


def test_rebuild_from_plan_and_reload_state_dict(compressed, image):
    dense, model, plan = compressed
    fresh = ts.compress(copy.deepcopy(dense), plan, decompose=False, progress=False)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(image), model(image))


def test_jit_script_trace_export(compressed, image):
    _, model, _ = compressed
    ref = model(image)
    torch.testing.assert_close(torch.jit.script(model)(image), ref)
    torch.testing.assert_close(torch.jit.trace(model, image)(image), ref)
    ep = torch.export.export(model, (image,))
    torch.testing.assert_close(ep.module()(image), ref)


def test_onnx_export_matches_onnxruntime(compressed, image, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, model, _ = compressed
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (image,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": image.numpy()})
    np.testing.assert_allclose(out, model(image).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_compress_rejects_mismatched_model(small_cnn, image, seq_net):
    plan = ts.make_plan(small_cnn, "tucker", image, target_macs=0.5)
    with pytest.raises(ValueError, match="does not have"):
        ts.compress(seq_net, plan, progress=False)
    other = copy.deepcopy(small_cnn)
    other.features[5] = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="features.5"):
        ts.compress(other, plan, progress=False)
    with pytest.raises(TypeError, match="CompressionPlan"):
        ts.compress(small_cnn, {"layers": []})


def test_set_submodule_keeps_mode_and_refuses_unknown_names():
    from tensorslim.surgery import set_submodule

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sequential(nn.ReLU(), nn.Linear(4, 5)))
    model[1].eval()  # the replaced module's mode is what the new one gets
    new = nn.Linear(4, 5).train()
    with torch.no_grad():
        new.weight.fill_(0.5), new.bias.fill_(-1.0)
    set_submodule(model, "1.1", new)
    assert model[1][1] is new and new.training is False and model[0].training is True
    x = torch.ones(2, 4)
    assert torch.equal(model[1](x), torch.full((2, 5), 1.0))  # relu(1) * 0.5 * 4 - 1
    for name in ("2", "1.7", "0.weight", "", "1.1.x"):
        with pytest.raises(ValueError, match=f"no submodule '{name}'.*named_modules"):
            set_submodule(model, name, nn.ReLU())
    with pytest.raises(TypeError, match="must be an nn.Module, got Tensor"):
        set_submodule(model, "0", torch.zeros(1))
    assert model[1][1] is new  # nothing changed on refusal


@pytest.mark.parametrize("method,layer,rank", [
    ("tucker", nn.Conv2d(6, 8, 3, padding=1), (3, 4)),
    ("svd", nn.Conv2d(6, 8, 3, padding=1), 4),
    ("svd", nn.Linear(12, 10), 5),
    ("cp", nn.Conv2d(6, 8, 3, padding=1), 5),
])
def test_build_layer_decomposes_through_from_dense(method, layer, rank):
    from tensorslim.layers import layer_for
    from tensorslim.plan import LayerSpec
    from tensorslim.surgery import build_layer

    torch.manual_seed(0)
    spec = LayerSpec(name="l", layer_type=type(layer).__name__, method=method, rank=rank,
                     params_before=0, params_after=0, macs_before=0, macs_after=0,
                     weight_shape=tuple(layer.weight.shape))
    built = build_layer(layer, spec)
    direct = layer_for(method, layer).from_dense(layer, rank)
    x = torch.randn(2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 12)
    with torch.no_grad():
        assert torch.allclose(built(x), direct(x), rtol=0, atol=1e-6)
    assert built.approx_error == pytest.approx(direct.approx_error, abs=1e-9)
    assert 0.0 < built.approx_error < 1.0

"""Issue 16 item 1: ``ts.fuse`` folds every eval-mode BatchNorm into the layer before it.

Tolerance. Folding changes the order of float32 roundings (``(s*W) x + b'`` instead of
``s*(W x) + ...``), so outputs agree to float32 rounding, not bit for bit. Single layers are
checked with ``assert_close``'s default float32 tolerances and, in float64, to 1e-12. Whole
models are checked at the default rtol with an atol scaled to the output's magnitude (an
element near zero is a difference of terms of the size of the largest outputs, so its
rounding error is relative to those), and against a float64 run of the unfused model: the
fused float32 model is no further from it than a small multiple of the unfused float32 one.
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tensorslim as ts
from tensorslim.fusion import fuse_with_report, fusion_report
from tensorslim.layers import LAYERS, TTLinear

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def assert_fused_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Default float32 rtol, atol scaled to the output's magnitude (see module docstring)."""
    assert_close(out, ref, rtol=1.3e-6, atol=1e-5 * max(1.0, float(ref.abs().max())))


# -- every layer type followed by a BatchNorm ---------------------------------------------------
def _dense_cases():
    yield "Conv1d", nn.Conv1d(8, 12, 3, padding=1), nn.BatchNorm1d, (3, 8, 11)
    yield "Conv2d-grouped-nobias", nn.Conv2d(8, 12, 3, stride=2, groups=2, bias=False), \
        nn.BatchNorm2d, (3, 8, 9, 7)
    yield "Conv3d", nn.Conv3d(8, 12, 3, padding=1), nn.BatchNorm3d, (2, 8, 5, 4, 6)
    yield "ConvTranspose1d-grouped", nn.ConvTranspose1d(8, 12, 3, stride=2, groups=2), \
        nn.BatchNorm1d, (3, 8, 11)
    yield "ConvTranspose2d-nobias", nn.ConvTranspose2d(8, 12, 3, groups=4, bias=False), \
        nn.BatchNorm2d, (3, 8, 9, 7)
    yield "ConvTranspose3d", nn.ConvTranspose3d(8, 12, 2, stride=2), nn.BatchNorm3d, (2, 8, 3, 4, 2)
    yield "Linear", nn.Linear(24, 20), nn.BatchNorm1d, (5, 24)


def _factorized_cases():
    ranks = {"cp": 8, "tucker": (4, 6), "svd": 4, "tt": 3, "filtercp": 2}
    for (method, dense), cls in LAYERS.items():
        if dense is nn.Embedding:  # (5,) token indices -> (5, 20): a BatchNorm1d(20) can follow
            yield cls.__name__, cls.like(nn.Embedding(30, 20), ranks[method]), nn.BatchNorm1d, (5,)
            continue
        if dense is nn.Linear:
            yield cls.__name__, cls.like(nn.Linear(24, 20), ranks[method]), nn.BatchNorm1d, (5, 24)
            continue
        two = dense is nn.Conv2d
        bn = nn.BatchNorm2d if two else nn.BatchNorm1d
        shape = (3, 8, 9, 7) if two else (3, 8, 11)
        for bias in (True, False):
            conv = dense(8, 12, 3, padding=1, groups=2, bias=bias)
            yield f"{cls.__name__}-bias={bias}", cls.like(conv, ranks[method]), bn, shape
    # one out-mode holds all 20 features: the scale folds into that TT core, no out_scale
    yield "TTLinear-one-wide-mode", TTLinear(24, 20, (4, 6), (1, 20), 3, bias=False), \
        nn.BatchNorm1d, (5, 24)


CASES = [pytest.param(*c[1:], id=c[0]) for c in (*_dense_cases(), *_factorized_cases())]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer,bn_type,shape", CASES)
def test_every_layer_type_folds_its_batchnorm_exactly(layer, bn_type, shape, dtype, affine):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(layer, bn_type(12 if len(shape) > 2 else 20,
                                                      affine=affine)).to(dtype))
    x = torch.randint(0, 30, shape) if hasattr(layer, "num_embeddings") else torch.randn(shape, dtype=dtype)
    fused, report = fuse_with_report(model)
    assert [f.bn for f in report.folded] == ["1"] and report.left == ()
    assert isinstance(fused[1], nn.Identity) and type(fused[0]) is type(layer)
    assert isinstance(model[1], bn_type)  # not in place: the original is untouched
    with torch.no_grad():
        ref, out = model(x), fused(x)
    if dtype == torch.float32:
        assert_close(out, ref)  # default float32 tolerances
    else:
        assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # folded into the layer's parameters: the same modules, no op added; parameters: the
    # layer's, plus a bias where it had none, plus a TT layer's out_scale (see TTLinear)
    before = sum(p.numel() for p in layer.parameters())
    after = sum(p.numel() for p in fused.parameters())
    out_ch = ref.shape[1]
    had_bias = any(n.endswith("bias") for n, _ in layer.named_parameters())
    extra = (0 if had_bias else out_ch) + (out_ch if getattr(fused[0], "out_scale", None)
                                           is not None else 0)
    assert after == before + extra
    assert len(list(fused.modules())) == len(list(model.modules()))


def test_tt_scale_goes_into_the_bias_add_unless_one_mode_holds_the_outputs():
    multi = ts.fuse(randomize_bn(nn.Sequential(TTLinear(24, 20, ranks=3), nn.BatchNorm1d(20))))
    assert multi[0].out_scale is not None and multi[0].out_scale.shape == (20,)
    one = ts.fuse(randomize_bn(nn.Sequential(TTLinear(24, 20, (4, 6), (1, 20), 3),
                                             nn.BatchNorm1d(20))))
    assert one[0].out_scale is None


def test_fusing_twice_composes_the_tt_scale():
    """A second BatchNorm after an Identity-replaced one is not adjacent, but a layer can be
    folded into twice (fuse, then fold again by hand): the scales compose."""
    torch.manual_seed(0)
    layer = TTLinear(24, 20, ranks=3)
    x = torch.randn(4, 24)
    a, b = torch.rand(20) + 0.5, torch.randn(20)
    with torch.no_grad():
        ref = (layer(x) * a + b) * a + b
        layer.fold_output_affine(a, b)
        layer.fold_output_affine(a, b)
        assert_close(layer(x), ref)


# -- refusals and what is left -------------------------------------------------------------------
def test_a_batchnorm_in_training_mode_is_refused_naming_it():
    model = randomize_bn(ts.models.create("vgg16", width=0.25))
    model.features[4].train()
    with pytest.raises(ValueError, match=r"^fuse: BatchNorm features\.4 is in training mode.*"
                                         r"call model\.eval\(\) first$") as e:
        ts.fuse(model)
    assert "\n" not in str(e.value)


class _Shared(nn.Module):
    """Pairs that must NOT fold: a conv output also used by a residual, a conv called twice,
    a BatchNorm after a ReLU, one without running statistics, a channel mismatch via view."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.b3 = nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c5, self.b5 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # the one foldable pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        y = self.b1(y) + y
        y = self.b2(self.c2(y)) + self.c2(x)
        y = self.b3(torch.relu(y))
        return self.b5(self.c5(self.b4(self.c4(y))))


def test_unfoldable_pairs_are_left_with_their_reason():
    torch.manual_seed(0)
    model = randomize_bn(_Shared())
    fused, report = fuse_with_report(model)
    assert [(f.bn, f.into) for f in report.folded] == [("b5", "c5")]
    left = dict(report.left)
    assert set(left) == {"b1", "b2", "b3", "b4"}
    assert "also used by" in left["b1"] and "called 2 times" in left["b2"]
    assert "not a module's output" in left["b3"] and "batch statistics" in left["b4"]
    x = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        assert_close(fused(x), model(x))
    assert "left b1:" in report.summary() and report.summary().startswith("fuse: folded 1")


class _WSConv(nn.Conv2d):
    """Weight standardisation: its own forward, so its weight is not what it computes with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = _WSConv(3, 4, 3), nn.BatchNorm2d(4)
        self.spare = nn.BatchNorm2d(4)  # registered, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_conv_with_its_own_forward_and_an_unused_batchnorm_are_left():
    torch.manual_seed(0)
    model = randomize_bn(_Custom())
    fused, report = fuse_with_report(model)
    assert report.folded == ()
    assert dict(report.left) == {"bn": "the _WSConv before it overrides forward",
                                 "spare": "not called by forward as traced"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=0, atol=0)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))
        self.fc, self.bn = nn.Linear(8, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).mean((2, 3))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = -y
        return self.bn(self.fc(y))


def test_an_untraceable_model_falls_back_to_sequential_adjacency():
    torch.manual_seed(0)
    model = randomize_bn(_Untraceable())
    fused, report = fuse_with_report(model)
    assert report.how.startswith("nn.Sequential adjacency (torch.fx could not trace")
    assert [(f.bn, f.into) for f in report.folded] == [("body.1", "body.0")]
    assert dict(report.left).keys() == {"body.5", "bn"}
    x = torch.randn(3, 3, 7, 6)
    with torch.no_grad():
        assert_close(fused(x), model(x))


def test_a_model_without_batchnorm_is_returned_unchanged():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).train()  # train mode is fine: no BN
    fused, report = fuse_with_report(model)
    assert report.folded == () and report.left == ()
    assert not hasattr(fused, "tensorslim_fused")


def test_inplace_and_argument_checks():
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    same = ts.fuse(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity)
    assert model.tensorslim_fused == (("1", "0", "Conv2d"),)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        ts.fuse(model, inplace=1)
    with pytest.raises(TypeError, match="fuse expects an nn.Module, got str"):
        ts.fuse("model")


# -- the registry and shipped models, dense and compressed --------------------------------------
def _compressed(model: nn.Module, method: str, x: torch.Tensor) -> nn.Module:
    if method == "dense":
        return model
    goal = {"ranks": 8} if method == "cp" else {"target_macs": 0.5}  # CP-ALS: small and quick
    plan = ts.make_plan(model, method, x, **goal)
    return ts.compress(copy.deepcopy(model), plan, progress=False)


def check_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    fused, report = fuse_with_report(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(f.bn for f in report.folded) == sorted(bns) and report.left == ()
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert_fused_close(out, ref)
        exact = copy.deepcopy(model).double()(x.double())
    err_fused = float((out.double() - exact).abs().max())
    err_plain = float((ref.double() - exact).abs().max())
    assert err_fused <= 4 * err_plain + 1e-6 * float(exact.abs().max())
    return fused


MODELS = [("vgg16", {"width": 0.25}), ("resnet20", {}), ("resnet18", {"width": 0.25})]


@pytest.mark.parametrize("method", ["dense", "tucker", "svd", "auto", "cp"])
@pytest.mark.parametrize("name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_registry_models_fuse_exactly_dense_and_compressed(name, kwargs, method):
    torch.manual_seed(0)
    model = randomize_bn(ts.models.create(name, **kwargs))
    x = torch.randn(3, 1, 32, 32)
    check_model(_compressed(model, method, x), x)


@pytest.mark.parametrize("name", ts.models.available_pretrained())
@pytest.mark.parametrize("method", ["dense", "tucker"])
def test_shipped_models_fuse_exactly(name, method):
    model = ts.models.load_pretrained(name).eval()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    check_model(_compressed(model, method, x), x)


# -- the fused model scripts, traces and exports -------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "tucker"])
def test_fused_model_scripts_traces_and_exports_to_onnx(method, tmp_path):
    from tensorslim.export import export_onnx

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    model = _compressed(randomize_bn(ts.models.create("resnet20")), method, x)
    fused = ts.fuse(model)
    with torch.no_grad():
        ref = fused(x)
        assert_close(torch.jit.script(fused)(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_close(torch.jit.trace(fused, (x,))(x), ref)
    res = export_onnx(fused, x, tmp_path / "fused.onnx", repeats=1, warmup=0)
    assert res.matches and res.max_rel_diff < 1e-4


def test_fused_tt_and_lowrank_linear_export_to_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(TTLinear(24, 20, ranks=3), nn.BatchNorm1d(20), nn.ReLU(),
                                       LAYERS[("svd", nn.Linear)].like(nn.Linear(20, 16), 4),
                                       nn.BatchNorm1d(16)))
    fused = ts.fuse(model)
    x = torch.randn(5, 24)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x)
        assert_close(torch.jit.script(fused)(x), ref)
    assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-5)


def test_fusion_report_is_a_dry_run():
    model = randomize_bn(ts.models.create("resnet20"))
    report = fusion_report(model)
    assert len(report.folded) == 21 and report.how == "torch.fx"
    assert report.folded[0].bn == "bn1" and report.folded[0].into == "conv1"
    assert isinstance(model.bn1, nn.BatchNorm2d)

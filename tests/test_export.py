"""ONNX export of compressed models: onnxruntime must reproduce the torch outputs."""
import math

import numpy as np
import pytest
import torch

import tensorslim as ts
from tensorslim.data import load_fashion_mnist
from tensorslim.export import ExportResult, export_onnx
from tensorslim.layers import FactorizedLayer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _images(n: int) -> torch.Tensor:
    """The first ``n`` real Fashion-MNIST test images as normalised (n, 1, 28, 28) inputs."""
    from tensorslim.data import Transform, to_inputs

    images, _ = load_fashion_mnist("test")
    return to_inputs(images[:n], Transform())


def _compressed(method: str, **goal):
    torch.manual_seed(0)
    model = ts.models.create("vgg16", width=0.125).eval()
    plan = ts.make_plan(model, method, _images(1), **goal)
    return ts.compress(model, plan, progress=False).eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _atol(model: torch.nn.Module, x: torch.Tensor) -> float:
    """1e-4 of the model's largest output on ``x``: an untrained VGG's logits are ~1e-5, so a
    fixed atol of 1e-5 would pass an all-zero ONNX output."""
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 0
    return 1e-4 * scale


def _assert_matches(path, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_ort(path, x), ref, rtol=1e-4, atol=_atol(model, x))


@pytest.mark.parametrize("method,goal", [
    ("cp", dict(target_macs=0.5)),
    ("tucker", dict(target_macs=0.3)),
    ("auto", dict(ranks=0.5)),
])
def test_compressed_model_matches_onnxruntime(tmp_path, method, goal):
    torch.set_num_threads(1)
    model = _compressed(method, **goal)
    assert any(isinstance(m, FactorizedLayer) for m in model.modules())
    x = _images(2)
    atol = _atol(model, x)
    res = export_onnx(model, x, tmp_path / "m.onnx", atol=atol, threads=1, repeats=3, warmup=1)
    assert type(res) is ExportResult and res.path == tmp_path / "m.onnx"
    assert (res.exporter, res.opset, res.dynamic_batch, res.checked) == ("torchscript", 17, True, True)
    assert res.matches is True and res.checked_batches == (2, 4)
    assert res.atol == atol and res.max_abs_diff is not None and res.max_abs_diff <= atol
    # the reported worst difference covers this batch: recompute it from the file itself
    with torch.no_grad():
        diff = float(np.abs(_ort(tmp_path / "m.onnx", x) - model(x).numpy()).max())
    assert diff <= res.max_abs_diff * (1 + 1e-6) + 1e-12, (diff, res.max_abs_diff)
    assert res.latency_batch == 2 and res.threads == 1
    assert all(math.isfinite(t) and t > 0 for t in (res.torch_latency_ms, res.ort_latency_ms))
    assert res.size_bytes == (tmp_path / "m.onnx").stat().st_size > 0
    # independently: another batch size through the dynamic batch axis
    _assert_matches(tmp_path / "m.onnx", model, _images(7))
    # the factorized form is what is exported (no dense weight rebuilt): the file stores no more
    # numbers than the compressed model has (BN may be folded into the convs), fewer than dense;
    # a CP layer's fused depthwise kernel (outer product of its kh x 1 and 1 x kw factors) is
    # folded to one R x kh x kw constant: R * (kh*kw - kh - kw) more numbers per CP layer
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    own = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    own += sum(m.rank * (m.geometry.kernel[0] * m.geometry.kernel[1] - sum(m.geometry.kernel))
               for m in model.modules() if getattr(m, "fused", False))
    dense = sum(p.numel() for p in ts.models.create("vgg16", width=0.125).parameters())
    assert stored <= own and sum(p.numel() for p in model.parameters()) < dense
    assert "OK" in res.table() and "max |ort - torch|" in res.table()
    assert not list(tmp_path.glob(".*tmp"))


def test_static_batch_and_no_check(tmp_path):
    model = _compressed("tucker", ranks=4)
    x = _images(3)
    res = export_onnx(model, x, tmp_path / "s.onnx", check=False, dynamic_batch=False)
    assert res.checked is False and res.matches is None and res.max_abs_diff is None
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 1, 28, 28]
    _assert_matches(tmp_path / "s.onnx", model, x)
    d = res.to_dict()
    assert d["path"] == str(tmp_path / "s.onnx") and d["size_bytes"] == (tmp_path / "s.onnx").stat().st_size
    assert d["dynamic_batch"] is False and d["checked"] is False and d["opset"] == res.opset


def test_as_dict_is_the_old_name_of_to_dict(tmp_path):
    res = ExportResult(tmp_path / "a.onnx", "torchscript", 17, 1234, True, checked=True,
                       checked_batches=(1, 3), max_abs_diff=2e-6, max_rel_diff=1e-5, rtol=1e-4,
                       atol=1e-5, matches=True, latency_batch=8, threads=1, torch_latency_ms=2.5,
                       ort_latency_ms=1.25)
    d = res.to_dict()
    assert res.as_dict() == d
    assert d == {"path": str(tmp_path / "a.onnx"), "exporter": "torchscript", "opset": 17,
                 "size_bytes": 1234, "dynamic_batch": True, "checked": True,
                 "checked_batches": (1, 3), "max_abs_diff": 2e-6, "max_rel_diff": 1e-5,
                 "rtol": 1e-4, "atol": 1e-5, "matches": True, "latency_batch": 8, "threads": 1,
                 "torch_latency_ms": 2.5, "ort_latency_ms": 1.25}
    assert "(2.00x)" in res.table()


def test_example_inputs_by_keyword(tmp_path):
    model = _compressed("svd", ranks=0.5)
    x = _images(2)
    res = export_onnx(model, example_inputs=x, path=tmp_path / "k.onnx", check=False)
    assert res.path == tmp_path / "k.onnx" and res.dynamic_batch is True
    _assert_matches(tmp_path / "k.onnx", model, x)
    from tensorslim.export import ort_session

    sess = ort_session(res.path, threads=1)
    assert sess.get_session_options().intra_op_num_threads == 1
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=_atol(model, x))


def test_export_restores_training_mode(tmp_path):
    model = _compressed("svd", ranks=0.5).train()
    export_onnx(model, _images(2), tmp_path / "t.onnx", check=False)
    assert model.training


def test_dynamo_exporter(tmp_path):
    model = _compressed("cp", ranks=4, include="features.2*")
    atol = _atol(model, _images(1))
    res = export_onnx(model, _images(1), tmp_path / "d.onnx", dynamo=True, atol=atol, threads=1, repeats=2,
                      warmup=0)
    assert res.exporter == "dynamo" and res.matches is True and res.checked_batches == (1, 3)
    assert res.max_abs_diff <= atol and res.latency_batch == 1
    _assert_matches(tmp_path / "d.onnx", model, _images(5))  # a batch size the check did not run
    assert not list(tmp_path.glob("*.data"))  # weights embedded in the one file


class _Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("boom")


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(_Broken(), torch.zeros(1, 4), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,exc,msg", [
    ((torch.nn.Linear(2, 2), torch.zeros(1, 2), "x.pt"), ValueError, "must end in .onnx"),
    (("model", torch.zeros(1, 2), "x.onnx"), TypeError, "expects an nn.Module"),
    ((torch.nn.Linear(2, 2), [1, 2], "x.onnx"), TypeError, "example_inputs must be one batched torch.Tensor"),
])
def test_bad_arguments(tmp_path, args, exc, msg):
    model, x, name = args
    with pytest.raises(exc, match=msg):
        export_onnx(model, x, tmp_path / name)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(3, 5)

    def forward(self, x, y):
        return {"out": self.a(x) * self.b(y), "aux": x.sum(1)}  # first tensor exported


def test_tuple_inputs_with_names(tmp_path):
    torch.manual_seed(0)
    model, xs = _TwoInputs().eval(), (torch.randn(3, 6), torch.randn(3, 3))
    res = export_onnx(model, xs, tmp_path / "two.onnx", input_names=["x", "y"], threads=1, repeats=2,
                      warmup=1, atol=1e-5)
    assert res.exporter == "torchscript" and res.matches is True and res.checked_batches == (3, 5)
    sess = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "y"]
    got = sess.run(None, {"x": xs[0].numpy(), "y": xs[1].numpy()})[0]
    np.testing.assert_allclose(got, model(*xs)["out"].detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_names must be 2 distinct names"):
        export_onnx(model, xs, tmp_path / "bad.onnx", input_names=["x"])


def test_hf_encoder_dict_inputs_choose_the_dynamo_exporter(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0  # padding: what TorchScript tracing gets wrong in transformers' mask code
    batch = {"input_ids": torch.randint(0, 80, (3, 10)), "attention_mask": mask}
    res = export_onnx(bert, batch, tmp_path / "bert.onnx", threads=1, repeats=1, warmup=0, atol=1e-4)
    assert res.exporter == "dynamo (auto: a transformers model)"
    assert res.matches is True and res.max_abs_diff < 1e-4 and res.checked_batches == (3, 5)
    sess = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        want = bert(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_auto_exporter_falls_back_to_dynamo_when_torchscript_mismatches(tmp_path, monkeypatch):
    """A TorchScript file that disagrees with torch (simulated: its exporter is fed a model with
    a shifted bias) is replaced by a torch.export one, and the result says why."""
    import copy

    import tensorslim.export as ex

    real = ex._export

    def mistraced(graph, xs, names, dest, opset, dynamic, dynamo):
        if not dynamo:
            graph = copy.deepcopy(graph)
            with torch.no_grad():
                graph.model.bias.add_(0.5)
        return real(graph, xs, names, dest, opset, dynamic, dynamo)

    monkeypatch.setattr(ex, "_export", mistraced)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3).eval(), torch.randn(3, 4)
    kw = dict(threads=1, repeats=1, warmup=0, atol=1e-5)
    ts_only = export_onnx(model, x, tmp_path / "ts.onnx", dynamo=False, **kw)
    assert ts_only.matches is False and abs(ts_only.max_abs_diff - 0.5) < 1e-5
    res = export_onnx(model, x, tmp_path / "auto.onnx", **kw)
    assert res.exporter == "dynamo (auto: the torchscript file mismatched by 0.5)"
    assert res.matches is True and res.checked_batches == (3, 5) and res.max_abs_diff < 1e-5

"""Per-layer rank sweeps on a tiny VGG-16 trained briefly on real Fashion-MNIST."""
import csv

import pytest
import torch
from _bounds import eckart_young, unfold_rank
from torch import nn

import tensorslim as ts
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.layers import FactorizedLayer, layer_for
from tensorslim.sweep import COLUMNS, SweepOptions, layer_rank, read_csv, run_sweep, sweep_table
from tensorslim.train import evaluate, train

LAYERS = ["features.3", "features.24"]  # (8 -> 8) and (32 -> 64) channels at width 0.125
RANKS = [2, 4, 8]
X1 = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    loaders = make_loaders(64, seed=0, subset=6400)
    torch.manual_seed(0)
    model = ts.models.create("vgg16", width=0.125)
    train(model, loaders.train, epochs=1, max_steps=120, lr=0.05, progress=False, log_every=0)
    test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(200)), 200)
    return model.eval(), loaders.train, test


@pytest.fixture(scope="module")
def swept(setup, tmp_path_factory):
    model, train_loader, test = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("sweep")
    rows = run_sweep(model, layers=LAYERS, ranks=RANKS, methods=("cp", "tucker"), test_loader=test,
                     train_loader=train_loader, finetune_steps=3, example_inputs=X1,
                     latency_batch=4, threads=1, out_dir=out, repeats=3, warmup=1, progress=False)
    return rows, out, before


def test_csv_has_exact_columns_and_one_row_per_point(swept):
    rows, out, _ = swept
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == COLUMNS
    assert len(table) == 1 + len(LAYERS) * 2 * len(RANKS)
    keys = [(r[0], r[1], int(r[2])) for r in table[1:]]
    assert keys == [(l, m, r) for l in LAYERS for m in ("cp", "tucker") for r in RANKS]
    assert [(r.layer, r.method, r.rank) for r in rows] == keys


def test_error_non_increasing_and_reduction_decreasing_in_rank(setup, swept):
    model, _, _ = setup
    rows, _, _ = swept
    for layer in LAYERS:
        for method in ("cp", "tucker"):
            sub = sorted((r for r in rows if r.layer == layer and r.method == method), key=lambda r: r.rank)
            assert [r.rank for r in sub] == RANKS, (layer, method)
            errs = [r.approx_error for r in sub]
            red = [r.param_reduction for r in sub]
            assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), (layer, method, errs)
            assert all(b < a for a, b in zip(red, red[1:])), (layer, method, red)
            # no kernel of that rank is closer than the Eckart-Young floor of the dense weight
            dense = model.get_submodule(layer)
            floors = [eckart_young(dense.weight, dense.groups, unfold_rank(layer_rank(dense, method, r.rank)))
                      for r in sub]
            assert all(f * (1 - 1e-5) <= e < 1.0 for e, f in zip(errs, floors)), (errs, floors)


def test_numbers_match_layer_costs_and_accuracy(setup, swept):
    model, _, test = setup
    rows, _, _ = swept
    acc = evaluate(model, test)["accuracy"]
    for r in rows:
        dense = model.get_submodule(r.layer)
        in_shape = ts.count(model, X1)[r.layer]
        p, _ = layer_for(r.method, dense).cost(dense, layer_rank(dense, r.method, r.rank),
                                               in_shape.in_shape[1:], in_shape.out_shape[1:])
        assert r.params_dense == dense.weight.numel()
        assert r.params_factorized == p
        assert r.param_reduction == pytest.approx(r.params_dense / r.params_factorized)
        assert r.speedup == pytest.approx(r.latency_dense_ms / r.latency_factorized_ms)
        assert r.latency_dense_ms > 0 and r.latency_factorized_ms > 0
        assert r.acc_dense == acc
        # accuracies are counts of the 200 test images, not averages of batch means
        for a in (r.acc_compressed, r.acc_finetuned):
            assert 0.0 <= a <= 1.0 and a * 200 == pytest.approx(round(a * 200), abs=1e-9), a
    # Tucker-2 at rank 8 on the 8-channel layer is exact: the model is unchanged
    exact = next(r for r in rows if (r.layer, r.method, r.rank) == ("features.3", "tucker", 8))
    assert exact.approx_error < 1e-6
    assert abs(exact.acc_compressed - acc) <= 1 / 200 + 1e-9


def test_dense_model_untouched_and_plots_written(setup, swept):
    model, _, _ = setup
    _, out, before = swept
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for layer in LAYERS:
        png = out / f"sweep_{layer}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))


def test_csv_round_trip_and_table(swept):
    rows, out, _ = swept
    back = read_csv(out / "sweep.csv")
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert (a.layer, a.method, a.rank, a.params_dense, a.params_factorized) == \
               (b.layer, b.method, b.rank, b.params_dense, b.params_factorized)
        assert b.approx_error == pytest.approx(a.approx_error, rel=1e-5, abs=1e-9)
        assert b.acc_finetuned == pytest.approx(a.acc_finetuned, rel=1e-5)
    text = sweep_table(rows)
    assert len(text.splitlines()) == 1 + len(rows) and "features.24" in text


def test_no_finetune_no_test_leaves_accuracy_empty(setup, tmp_path):
    model, _, _ = setup
    opts = SweepOptions(layers=["features.24"], ranks=[4], methods=["svd"], latency_batch=2,
                        threads=1, out_dir=tmp_path, repeats=1, warmup=0, progress=False)
    assert (opts.layers, opts.ranks, opts.methods) == (("features.24",), (4,), ("svd",))
    rows = run_sweep(model, opts, example_inputs=X1)
    assert len(rows) == 1 and rows[0].acc_dense is None and rows[0].acc_finetuned is None
    line = (tmp_path / "sweep.csv").read_text().splitlines()[1]
    assert line.endswith(",,,")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(layers=["features.99"]), "accepted conv layers: features.0, features.3"),
    (dict(layers=["classifier.0"]), "no factorized layer for method='cp'"),
    (dict(ranks=[0, 4]), "ranks must be a non-empty list of positive ints"),
    (dict(ranks=[4, 4]), "ranks has duplicates"),
    (dict(ranks=[10_000]), "layer features.3, method cp, rank 10000"),
    (dict(methods=["tt"]), "unknown sweep method(s) ['tt']; known: cp, tucker, svd"),
    (dict(finetune_steps=5), "finetune_steps > 0 needs a train_loader"),
])
def test_bad_arguments_are_clear_errors(setup, kwargs, msg):
    model, _, _ = setup
    args = dict(layers=["features.3"], ranks=[4], methods=["cp"], test_loader=None,
                train_loader=None, finetune_steps=0, example_inputs=X1, latency_batch=2,
                threads=1, out_dir=None, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        run_sweep(model, **args)
    assert msg in str(e.value)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="run_sweep expects an nn.Module"):
        run_sweep(nn.Linear(2, 2).weight, layers=["x"], ranks=[1], example_inputs=X1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(layers=["features.3"], ranks=[4], example_inputs=X1, rank=[4]),
     "run_sweep: unknown setting(s) 'rank' (did you mean 'ranks'?)"),
    (dict(ranks=[4], example_inputs=X1), "run_sweep: missing required setting(s) 'layers'"),
    (dict(layers=["features.3"], ranks=[4]), "run_sweep: example_inputs is required"),
])
def test_settings_errors_name_the_setting(setup, kwargs, msg):
    model, _, _ = setup
    with pytest.raises(TypeError) as e:
        run_sweep(model, **kwargs)
    assert msg in str(e.value)


def test_options_check_their_numbers():
    base = dict(layers=["a"], ranks=[1])
    assert SweepOptions(**base) == SweepOptions(layers=("a",), ranks=(1,), methods=("cp", "tucker"),
                                                finetune_steps=0, finetune_lr=0.01, latency_batch=64,
                                                threads=None, repeats=20, warmup=3, out_dir=None)
    for name, bad, msg in [("finetune_steps", -1, "finetune_steps must be an int >= 0, got -1"),
                           ("latency_batch", 0, "latency_batch must be an int >= 1, got 0"),
                           ("threads", 0, "threads must be an int >= 1 or None, got 0"),
                           ("repeats", True, "repeats must be an int >= 1, got True"),
                           ("finetune_lr", 0.0, "finetune_lr must be a number > 0, got 0.0")]:
        with pytest.raises(ValueError) as e:
            SweepOptions(**base, **{name: bad})
        assert str(e.value) == msg

"""ONNX export of a (compressed) model, with a numerical check against onnxruntime.

The factorized layers export as chains of ordinary ``Conv`` / ``Gemm`` / ``MatMul`` nodes, so
an exported compressed model runs in any ONNX runtime without tensorslim, keeping the
factorized layers' lower MAC count.

Inputs are one tensor (graph input ``input``), a tuple of positional tensors (``input_0``,
``input_1``, ... or ``input_names``) or a dict of keyword tensors (a tokenizer's output; the
graph inputs take the keys' names). A model returning a tuple, a dict or a Hugging Face
``ModelOutput`` exports its first tensor (``last_hidden_state`` of an encoder).

Exporters: ``dynamo=False`` is the TorchScript exporter, ``True`` the ``torch.export``-based
one. ``dynamo=None`` (auto) uses TorchScript for plain models, and ``torch.export`` for
Hugging Face ``transformers`` models (TorchScript tracing bakes transformers' attention-mask
construction into wrong constants) and whenever the TorchScript file fails the onnxruntime
check; ``ExportResult.exporter`` says which one wrote the file and why.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .files import atomic_write


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and, when checked, how onnxruntime compares to torch.

    ``max_abs_diff`` / ``max_rel_diff``: worst differences of the ONNX outputs from the torch
    outputs over ``checked_batches`` (batch sizes run); ``matches``: every output is within
    ``|ort - torch| <= atol + rtol * |torch|``. Latencies are medians on the latency input.
    """

    path: Path
    exporter: str
    opset: int
    size_bytes: int
    dynamic_batch: bool
    checked: bool = False
    checked_batches: tuple[int, ...] = ()
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    rtol: float | None = None
    atol: float | None = None
    matches: bool | None = None
    latency_batch: int | None = None
    threads: int | None = None
    torch_latency_ms: float | None = None
    ort_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (``path`` as a string)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    as_dict = to_dict  # the earlier name, kept for callers of as_dict()

    def table(self) -> str:
        lines = [f"onnx file        {self.path} ({self.size_bytes / 1e6:.2f} MB, {self.exporter} "
                 f"exporter, opset {self.opset}, dynamic batch: {self.dynamic_batch})"]
        if self.checked:
            verdict = "OK" if self.matches else "MISMATCH"
            lines.append(f"onnxruntime check {verdict}: max |ort - torch| = {self.max_abs_diff:.3g} "
                         f"(max rel {self.max_rel_diff:.3g}) on batch sizes "
                         f"{', '.join(map(str, self.checked_batches))}; tolerance atol={self.atol:g}, "
                         f"rtol={self.rtol:g}")
            sp = self.torch_latency_ms / self.ort_latency_ms  # type: ignore[operator]
            lines.append(f"latency (batch {self.latency_batch}, {self.threads} threads): torch "
                         f"{self.torch_latency_ms:.3f} ms, onnxruntime {self.ort_latency_ms:.3f} ms "
                         f"({sp:.2f}x)")
        return "\n".join(lines)


class _Graph(nn.Module):
    """``model`` with positional tensor inputs in ``names`` order and one tensor out."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names) if names is not None else None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args))) if self.names else self.model(*args)
        return _first_tensor(out)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"export_onnx: the model returned {type(out).__name__} with no tensor in it")


def _inputs(example_inputs: Any, input_names: Sequence[str] | None) -> tuple[tuple[torch.Tensor, ...],
                                                                             tuple[str, ...], bool]:
    """(tensors, graph input names, keyword call) of the accepted ``example_inputs`` forms."""
    keyword = isinstance(example_inputs, Mapping)
    if isinstance(example_inputs, torch.Tensor):
        xs, default = (example_inputs,), ("input",)
    elif keyword:
        xs, default = tuple(example_inputs.values()), tuple(str(k) for k in example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        xs = tuple(example_inputs)
        default = tuple(f"input_{i}" for i in range(len(xs)))
    else:
        xs, default = (), ()
    if not xs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in xs):
        raise TypeError(f"export_onnx: example_inputs must be one batched torch.Tensor (B, ...), a tuple "
                        f"of them or a dict of them (a tokenizer's output), got {type(example_inputs).__name__}")
    if keyword and input_names is not None:
        raise ValueError("export_onnx: input_names cannot rename dict example_inputs (the keys are the names)")
    names = default if input_names is None else tuple(input_names)
    if len(names) != len(xs) or len(set(names)) != len(names) or "output" in names:
        raise ValueError(f"export_onnx: input_names must be {len(xs)} distinct names other than 'output', "
                         f"got {list(names)}")
    return xs, names, keyword


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    check: bool = True,
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamo: bool | None = None,
    input_names: Sequence[str] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    latency_input: Any = None,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> ExportResult:
    """Export ``model`` (run in eval mode) to ONNX at ``path`` (``*.onnx``), atomically.

    ``example_inputs``: one batched tensor (B, ...), a tuple of them or a dict of keyword
    tensors (see the module docstring; ``input_names`` names tuple inputs), which trace the
    graph; the batch axis of every input is dynamic unless ``dynamic_batch=False``.
    ``dynamo``: False the TorchScript exporter, True the ``torch.export``-based one (weights
    embedded in the one file), None (default) chooses (module docstring). With ``check``,
    onnxruntime runs the file on ``example_inputs`` (and on a batch of another size when the
    batch is dynamic: float inputs random, others their rows repeated) and the outputs are
    compared with torch's; then both are timed on ``latency_input`` (default
    ``example_inputs``, same form) with ``threads`` threads.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    xs, names, keyword = _inputs(example_inputs, input_names)
    lat = xs if latency_input is None else _inputs(latency_input, None if keyword else names)[0]
    if dynamo not in (None, True, False):
        raise ValueError(f"dynamo must be True, False or None (choose), got {dynamo!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX path must end in .onnx, got {str(path)!r}")
    if not isinstance(opset, int) or not 9 <= opset <= 23:
        raise ValueError(f"opset must be an int in [9, 23], got {opset!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    graph = _Graph(model, names if keyword else None).eval()  # exporters restore the wrapper's mode
    auto = dynamo is None
    use_dynamo = bool(dynamo) or auto and _is_transformers(model)
    why = " (auto: a transformers model)" if auto and use_dynamo else ""
    try:
        while True:
            atomic_write(path, lambda tmp: _export(graph, xs, names, tmp, opset, dynamic_batch, use_dynamo))
            result = ExportResult(path, ("dynamo" if use_dynamo else "torchscript") + why,
                                  _file_opset(path, opset), path.stat().st_size, dynamic_batch)
            if check:
                result = _check(graph, xs, names, result, rtol, atol, lat, threads, repeats, warmup)
            if not (auto and check and not use_dynamo and not result.matches):
                break
            use_dynamo = True  # TorchScript mis-traced: the torch.export-based exporter next
            why = f" (auto: the torchscript file mismatched by {result.max_abs_diff:.3g})"
    finally:
        model.train(was_training)
    return result


def _export(model: nn.Module, xs: tuple[torch.Tensor, ...], names: tuple[str, ...], dest: str,
            opset: int, dynamic: bool, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # one entry for forward's *args: a dynamic batch axis per input
            shapes = (tuple({0: torch.export.Dim.AUTO} for _ in xs),) if dynamic else None
            if dynamic and xs[0].shape[0] == 1:  # torch.export specialises a batch of 1
                xs = tuple(torch.cat([x, x]) for x in xs)
            try:
                torch.onnx.export(model, xs, dest, dynamo=True, opset_version=opset,
                                  input_names=list(names), output_names=["output"],
                                  dynamic_shapes=shapes, external_data=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - the exporter raises many internal types
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ValueError(f"the torch.export-based ONNX exporter failed ({type(e).__name__}: "
                                 f"{first}); try dynamo=False (the TorchScript exporter)") from e
        else:
            axes = {n: {0: "batch"} for n in (*names, "output")} if dynamic else None
            torch.onnx.export(model, xs, dest, dynamo=False, opset_version=opset,
                              input_names=list(names), output_names=["output"], dynamic_axes=axes)


def _file_opset(path: Path, requested: int) -> int:
    """The default-domain opset the file declares (the exporter may raise the requested one)."""
    try:
        import onnx
    except ImportError:
        return requested
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), requested)


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` on the CPU for the ONNX file ``path``, with
    ``threads`` intra-op threads (default: torch's current count) and one inter-op thread,
    as :func:`export_onnx` checks and times it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModuleNotFoundError("checking an ONNX export needs onnxruntime "
                                  "(pip install onnxruntime), or pass check=False") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting worker threads after a run: they would keep the cores busy and slow
    # whatever runs next in this process (torch timed side by side with onnxruntime)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _other_batch(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with 2 more rows: random float tensors, other inputs' rows repeated."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in xs:
        if x.is_floating_point():
            out.append(torch.randn((x.shape[0] + 2, *x.shape[1:]), generator=gen, dtype=x.dtype))
        else:
            out.append(torch.cat([x, x[torch.arange(2) % x.shape[0]]]))
    return tuple(out)


def _check(model: nn.Module, xs: tuple[torch.Tensor, ...], names: tuple[str, ...], result: ExportResult,
           rtol: float, atol: float, lat_xs: tuple[torch.Tensor, ...], threads: int | None, repeats: int,
           warmup: int) -> ExportResult:
    from dataclasses import replace

    from .cost import measure_latency

    sess = ort_session(result.path, threads)
    runs = [xs] + ([_other_batch(xs)] if result.dynamic_batch else [])
    device = next(model.parameters()).device
    max_abs = max_rel = 0.0
    ok = True
    for inp in runs:
        with torch.inference_mode():
            ref = model(*[x.to(device) for x in inp]).float().cpu().numpy()
        (got,) = sess.run(None, _feed(names, inp))
        diff = np.abs(got - ref)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(ref), 1e-12)).max()))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(ref)))
    used = threads or torch.get_num_threads()
    t_ms = measure_latency(model, lat_xs, repeats=repeats, warmup=warmup, threads=used).median_ms
    o_ms = _ort_latency(sess, _feed(names, lat_xs), repeats, warmup)
    return replace(result, checked=True, checked_batches=tuple(int(i[0].shape[0]) for i in runs),
                   max_abs_diff=max_abs, max_rel_diff=max_rel, rtol=rtol, atol=atol, matches=ok,
                   latency_batch=int(lat_xs[0].shape[0]), threads=used, torch_latency_ms=t_ms,
                   ort_latency_ms=o_ms)


def _feed(names: tuple[str, ...], xs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {n: x.detach().cpu().numpy() for n, x in zip(names, xs)}


def _ort_latency(sess: Any, feed: dict[str, np.ndarray], repeats: int, warmup: int) -> float:
    """Median wall time (ms) of ``sess.run`` on the input ``feed``."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

"""ONNX export of a (compressed) model, with a numerical check against onnxruntime.

The factorized layers export as chains of ordinary ``Conv`` / ``Gemm`` / ``MatMul`` nodes, so
an exported compressed model runs in any ONNX runtime without tensorslim, keeping the
factorized layers' lower MAC count.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor,
    path: str | os.PathLike,
    *,
    check: bool = True,
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamo: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    latency_input: torch.Tensor | None = None,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> ExportResult:
    """Export ``model`` (run in eval mode) to ONNX at ``path`` (``*.onnx``), atomically.

    ``example_inputs``: one batched tensor (B, ...), the graph's input, which traces the graph;
    the batch axis is dynamic unless ``dynamic_batch=False``. ``dynamo=False`` uses the
    TorchScript exporter (robust for these models), ``True`` the ``torch.export``-based one
    (weights embedded in the one file). With ``check``, onnxruntime runs the file on
    ``example_inputs`` (and on a batch of another size when the batch is dynamic) and the
    outputs are compared with torch's; then both are timed on ``latency_input`` (default
    ``example_inputs``) with ``threads`` threads.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 1:
        raise TypeError(f"export_onnx: example_inputs must be one batched torch.Tensor (B, ...), "
                        f"got {type(example_inputs).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX path must end in .onnx, got {str(path)!r}")
    if not isinstance(opset, int) or not 9 <= opset <= 23:
        raise ValueError(f"opset must be an int in [9, 23], got {opset!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        atomic_write(path, lambda tmp: _export(model, example_inputs, tmp, opset, dynamic_batch, dynamo))
        result = ExportResult(path, "dynamo" if dynamo else "torchscript", _file_opset(path, opset),
                              path.stat().st_size, dynamic_batch)
        if check:
            result = _check(model, example_inputs, result, rtol, atol,
                            latency_input if latency_input is not None else example_inputs,
                            threads, repeats, warmup)
    finally:
        model.train(was_training)
    return result


def _export(model: nn.Module, x: torch.Tensor, dest: str, opset: int, dynamic: bool,
            dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim.AUTO},) if dynamic else None
            if dynamic and x.shape[0] == 1:  # torch.export specialises a batch of 1
                x = torch.cat([x, x])
            try:
                torch.onnx.export(model, (x,), dest, dynamo=True, opset_version=opset,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_shapes=shapes, external_data=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - the exporter raises many internal types
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ValueError(f"the torch.export-based ONNX exporter failed ({type(e).__name__}: "
                                 f"{first}); try dynamo=False (the TorchScript exporter)") from e
        else:
            axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
            torch.onnx.export(model, (x,), dest, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"], dynamic_axes=axes)


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


def _check(model: nn.Module, x: torch.Tensor, result: ExportResult, rtol: float, atol: float,
           lat_x: torch.Tensor, threads: int | None, repeats: int, warmup: int) -> ExportResult:
    from dataclasses import replace

    from .cost import measure_latency

    sess = ort_session(result.path, threads)
    inputs = [x]
    if result.dynamic_batch:
        gen = torch.Generator().manual_seed(0)
        inputs.append(torch.randn((x.shape[0] + 2, *x.shape[1:]), generator=gen, dtype=x.dtype))
    max_abs = max_rel = 0.0
    ok = True
    for inp in inputs:
        with torch.inference_mode():
            ref = model(inp.to(next(model.parameters()).device)).float().cpu().numpy()
        (got,) = sess.run(None, {"input": inp.cpu().numpy()})
        diff = np.abs(got - ref)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(ref), 1e-12)).max()))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(ref)))
    used = threads or torch.get_num_threads()
    t_ms = measure_latency(model, lat_x, repeats=repeats, warmup=warmup, threads=used).median_ms
    o_ms = _ort_latency(sess, lat_x.cpu().numpy(), repeats, warmup)
    return replace(result, checked=True, checked_batches=tuple(int(i.shape[0]) for i in inputs),
                   max_abs_diff=max_abs, max_rel_diff=max_rel, rtol=rtol, atol=atol, matches=ok,
                   latency_batch=int(lat_x.shape[0]), threads=used, torch_latency_ms=t_ms,
                   ort_latency_ms=o_ms)


def _ort_latency(sess: Any, x: np.ndarray, repeats: int, warmup: int) -> float:
    """Median wall time (ms) of ``sess.run`` on ``x``."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

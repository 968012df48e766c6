"""Reports a person can read: Markdown tables and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .files import write_text_atomic
from .plan import CompressionPlan


@dataclass(frozen=True)
class ModelSummary:
    """Whole-model numbers for one variant (baseline, compressed, fine-tuned, ...)."""

    label: str
    accuracy: float | None
    params: int
    macs: int
    latency_ms: float | None
    latency1_ms: float | None = None  # at batch 1, when measured

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return asdict(self)

    as_dict = to_dict  # the earlier name, kept for callers of as_dict()


def summary_table(rows: Sequence[ModelSummary], *, markdown: bool = False) -> str:
    """A table of model variants with ratios against the first row."""
    base = rows[0]
    head = ["model", "test acc %", "params", "MACs", "MACs ratio", "latency ms", "speed-up"]
    batch1 = any(r.latency1_ms is not None for r in rows)
    if batch1:
        head += ["batch-1 ms", "batch-1 speed-up"]
    lines = []
    for r in rows:
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
        line = [r.label, acc, f"{r.params:,d}", f"{r.macs:,d}", f"{base.macs / r.macs:.2f}x",
                *_latency_cells(r.latency_ms, base.latency_ms)]
        lines.append(line + (_latency_cells(r.latency1_ms, base.latency1_ms) if batch1 else []))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(l) for l in lines])


def _latency_cells(ms: float | None, base: float | None) -> list[str]:
    """``[ms, speed-up against base]`` as table cells ("-" where unmeasured)."""
    if ms is None:
        return ["-", "-"]
    return [f"{ms:.2f}", "-" if base is None else f"{base / ms:.2f}x"]


def plan_markdown(plan: CompressionPlan) -> str:
    head = ("| layer | type | method | rank | params before → after | MACs before → after | "
            "weight error ‖W−Ŵ‖/‖W‖ | note |")
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for s in plan.layers:
        err = "" if s.error is None else f"{s.error:.3f}"
        rank = "" if s.rank is None else str(s.rank)
        out.append(f"| {s.name} | {s.layer_type} | {s.method} | {rank} | {s.params_before:,d} → "
                   f"{s.params_after:,d} | {s.macs_before:,d} → {s.macs_after:,d} | {err} | {s.reason} |")
    return "\n".join(out)


def plot_summary(rows: Sequence[ModelSummary], path: str | os.PathLike) -> Path:
    """Four panels: accuracy, params, MACs, latency per model variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    labels = [r.label for r in rows]
    panels = [
        ("test accuracy (%)", [100 * (r.accuracy or 0) for r in rows]),
        ("parameters (M)", [r.params / 1e6 for r in rows]),
        ("MACs (M, per image)", [r.macs / 1e6 for r in rows]),
        ("latency (ms)", [r.latency_ms or 0 for r in rows]),
    ]
    for ax, (title, vals) in zip(axes, panels):
        bars = ax.bar(range(len(vals)), vals, color=["#777"] + ["#2a7"] * (len(vals) - 1))
        ax.set_title(title)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    if rows[0].accuracy:
        lo = min(100 * (r.accuracy or 0) for r in rows)
        axes[0].set_ylim(max(0, lo - 5), 100)
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_layers(plan: CompressionPlan, path: str | os.PathLike) -> Path:
    """MACs before/after for every counted layer of the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in plan.layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [s.macs_before / 1e6 for s in plan.layers], 0.4, label="dense", color="#777")
    ax.bar([i + 0.2 for i in x], [s.macs_after / 1e6 for s in plan.layers], 0.4, label="compressed", color="#2a7")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MACs (M)")
    ax.set_title(f"per-layer MACs, {plan.method}: {plan.macs_before / max(1, plan.macs_after):.2f}x fewer overall")
    ax.legend()
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    from .files import atomic_write

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_report(out_dir: str | os.PathLike, title: str, rows: Sequence[ModelSummary],
                 plan: CompressionPlan, notes: Sequence[str] = ()) -> Path:
    """Write ``report.md`` with the summary and plan tables, plus ``summary.png`` and
    ``layers.png``, into ``out_dir``. Returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_summary(rows, out / "summary.png")
    plot_layers(plan, out / "layers.png")
    md = [f"# {title}", "", summary_table(rows, markdown=True), "", "![summary](summary.png)", ""]
    md += [f"- {n}" for n in notes] + [""]
    md += ["## Per-layer plan", "", plan_markdown(plan), "", "![layers](layers.png)", ""]
    return write_text_atomic(out / "report.md", "\n".join(md))

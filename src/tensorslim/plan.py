"""Compression plans: which layer gets which factorization at which rank, and why.

A plan is data: frozen dataclasses that round-trip through JSON, so it can be read, edited,
saved next to the weights and replayed by :func:`tensorslim.compress` / :func:`tensorslim.load`.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

PLAN_VERSION = 1
METHODS = ("cp", "tucker", "svd", "tt", "auto", "filtercp")
KEEP = "keep"


def freeze(v: Any) -> Any:
    """JSON lists back to tuples (recursively) so specs stay hashable and comparable."""
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return {k: freeze(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class LayerSpec:
    """What happens to one layer.

    ``method`` is one of ``cp``, ``tucker``, ``svd``, ``tt`` or ``keep`` (left dense, see
    ``reason``). ``rank`` is an int (cp, svd, tt max TT-rank) or a tuple (tucker: (r_in, r_out)).
    ``options`` holds method extras (tt: in_modes/out_modes). MACs are for the plan's example
    inputs (with their batch). ``error`` is the relative weight approximation error
    ||W - W^|| / ||W||, when measured. ``weight_shape`` is the dense layer's weight shape
    when planned (``()`` when unknown, e.g. in plans written before it was recorded);
    :func:`tensorslim.compress` refuses a model whose layer has another shape.
    """

    name: str
    layer_type: str
    method: str
    rank: int | tuple[int, ...] | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    error: float | None = None
    reason: str = ""
    weight_shape: tuple[int, ...] = ()

    @property
    def compressed(self) -> bool:
        return self.method != KEEP

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan's layer entry must be a JSON object, got {type(d).__name__} {d!r:.60}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LayerSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: freeze(v) for k, v in d.items()})


@dataclass(frozen=True)
class FusedBN:
    """One BatchNorm folded into the layer before it by :func:`tensorslim.fuse`.

    ``bn``: the BatchNorm's qualified name (an ``nn.Identity`` since); ``into``: the layer
    that absorbed it; ``into_type``: that layer's class name when it was folded (a dense
    type, e.g. ``Conv2d``, when the model was fused before it was compressed: :func:`load`
    then folds before replaying the plan, so the rebuilt layers have the saved structure).
    """

    bn: str
    into: str
    into_type: str

    @classmethod
    def from_json(cls, v: Any) -> "FusedBN":
        if isinstance(v, Mapping):
            v = (v.get("bn"), v.get("into"), v.get("into_type"))
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(x, str) and x for x in v)):
            raise ValueError(f"a plan's 'fused' entry must be an object {{bn, into, into_type}} "
                             f"of non-empty strings, got {v!r:.80}")
        return cls(*v)


@dataclass(frozen=True)
class Edit:
    """One structural change a method made to the model before its layers were factorized
    (e.g. filters pruned, a block replaced), replayed by :func:`tensorslim.compress` and
    :func:`tensorslim.load` through the op registered with
    :func:`tensorslim.surgery.register_edit`.

    ``op``: the registered op's name; ``target``: the qualified name of the module it changes;
    ``args``: JSON data the op needs (e.g. the kept filter indices).
    """

    op: str
    target: str
    args: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, v: Any) -> "Edit":
        if not (isinstance(v, Mapping) and isinstance(v.get("op"), str) and v["op"]
                and isinstance(v.get("target"), str) and isinstance(v.get("args", {}), Mapping)
                and set(v) <= {"op", "target", "args"}):
            raise ValueError(f"a plan's 'edits' entry must be an object {{op, target, args}} (op a "
                             f"non-empty string, target a string, args an object), got {v!r:.80}")
        return cls(v["op"], v["target"], freeze(dict(v.get("args", {}))))


@dataclass(frozen=True)
class CompressionPlan:
    """A per-layer compression plan plus the goal that produced it and model totals.

    ``fused``: the BatchNorms :func:`tensorslim.fuse` folded into the model (empty for
    an unfused model, and in plans written before fusion existed); :func:`tensorslim.load`
    replays them after the layers. ``edits``: structural changes (pruned filters, replaced
    blocks) made before the layers were factorized; replayed first, in order.
    """

    layers: tuple[LayerSpec, ...]
    method: str
    goal: Mapping[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    version: int = PLAN_VERSION
    fused: tuple[FusedBN, ...] = ()
    edits: tuple[Edit, ...] = ()

    def __getitem__(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(f"plan has no layer {name!r}; layers: {[s.name for s in self.layers]}")

    @property
    def compressed(self) -> tuple[LayerSpec, ...]:
        return tuple(s for s in self.layers if s.compressed)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def with_layers(self, layers: tuple[LayerSpec, ...]) -> "CompressionPlan":
        """A copy with new layer specs and totals recomputed."""
        dp = sum(s.params_after - s.params_before for s in layers)
        dm = sum(s.macs_after - s.macs_before for s in layers)
        old_dp = sum(s.params_after - s.params_before for s in self.layers)
        old_dm = sum(s.macs_after - s.macs_before for s in self.layers)
        return replace(
            self, layers=layers,
            params_after=self.params_after - old_dp + dp, macs_after=self.macs_after - old_dm + dm,
        )

    def with_errors(self, errors: Mapping[str, float | None]) -> "CompressionPlan":
        """A copy whose specs named in ``errors`` record that approximation error
        (``None`` values are skipped); e.g. the errors measured while decomposing, see
        :func:`tensorslim.surgery.layer_errors`. Unknown names are an error."""
        names = {s.name for s in self.layers}
        unknown = sorted(set(errors) - names)
        if unknown:
            close = {u: difflib.get_close_matches(str(u), sorted(names), n=3) for u in unknown}
            hint = "; ".join(f"{u!r} -> {c}" for u, c in close.items() if c)
            raise ValueError(f"with_errors: the plan has no layers {unknown}"
                             f"{'; close matches: ' + hint if hint else ''}")
        layers = tuple(s if errors.get(s.name) is None else replace(s, error=float(errors[s.name]))
                       for s in self.layers)
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompressionPlan":
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {version!r}; this tensorslim reads version {PLAN_VERSION}")
        d = dict(d)
        raw = d.pop("layers", [])
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"a plan's 'layers' must be a JSON list, got {type(raw).__name__}")
        layers = tuple(LayerSpec.from_dict(x) for x in raw)
        fused = d.pop("fused", [])
        if not isinstance(fused, (list, tuple)):
            raise ValueError(f"a plan's 'fused' must be a JSON list, got {type(fused).__name__}")
        edits = d.pop("edits", [])
        if not isinstance(edits, (list, tuple)):
            raise ValueError(f"a plan's 'edits' must be a JSON list, got {type(edits).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(layers=layers, fused=tuple(FusedBN.from_json(f) for f in fused),
                   edits=tuple(Edit.from_json(e) for e in edits), **{k: freeze(v) for k, v in d.items()})

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically (temp file + rename)."""
        from .files import write_text_atomic

        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionPlan":
        """Read a plan written by :meth:`save`; ValueError naming ``path`` if it is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a compression plan (not UTF-8 text)") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a valid compression plan: {e}") from None

    def table(self) -> str:
        """A human-readable table of the plan (what will change, before it changes)."""
        head = (f"{'layer':32s} {'type':10s} {'method':7s} {'rank':>12s} {'params':>19s} "
                f"{'MACs':>25s} {'error':>6s}  reason")
        rows = [head]
        for s in self.layers:
            rank = "" if s.rank is None else str(s.rank)
            err = "" if s.error is None else f"{s.error:.3f}"
            rows.append(
                f"{s.name:32s} {s.layer_type:10s} {s.method:7s} {rank:>12s} "
                f"{s.params_before:>9,d}->{s.params_after:<9,d} {s.macs_before:>12,d}->{s.macs_after:<12,d} "
                f"{err:>6s}  {s.reason}"
            )
        if any(s.error is not None for s in self.layers):
            rows.append("error: relative weight approximation error ||W - W^|| / ||W|| at decomposition")
        for e in self.edits:
            rows.append(f"edit: {e.op} {e.target}")
        if self.fused:
            rows.append(f"fused: {len(self.fused)} BatchNorm(s) folded into the layer before them")
        rows.append(
            f"total: params {self.params_before:,d} -> {self.params_after:,d} ({self.params_ratio:.3f}x), "
            f"MACs {self.macs_before:,d} -> {self.macs_after:,d} ({self.macs_ratio:.3f}x)"
        )
        return "\n".join(rows)


def unknown_names_error(what: str, unknown: Iterable[str], names: Sequence[str]) -> ValueError:
    """The ValueError for layer names (or globs) in ``what`` that name no layer: each with
    its close matches among ``names`` (difflib), and the layer names that exist."""
    parts = []
    for u in sorted(unknown):
        close = difflib.get_close_matches(u, names, n=3, cutoff=0.6)
        parts.append(f"{u!r}" + (f" (close matches: {', '.join(map(repr, close))})" if close else ""))
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return ValueError(f"{what} names no layer of this model: {'; '.join(parts)}. "
                      f"Layers: {shown or 'none'}")

"""Registry of compression pipelines: name -> entry function and what it needs.

Every pipeline in ``methods/`` (one file, one entry function) registers itself here when
its module is imported, so the CLI (``tensorslim compress --method NAME``) and the generic
tests (tests/methods/test_pipelines.py: contract, plan/count agreement, save/load round
trip) cover it without further wiring. A pipeline's entry function has the shape

    run(model, example_inputs, *, <goal keywords>, train_loader=..., calibration=...,
        finetune_steps=..., progress=..., seed=..., **its own settings) -> result

and ``result`` has ``.model`` (a new module; the input model is left untouched), ``.plan``
(a :class:`~tensorslim.plan.CompressionPlan` that :func:`tensorslim.compress` and
:func:`tensorslim.load` replay, structural changes included as ``plan.edits``) and
``.history``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Pipeline", "PIPELINES", "register_pipeline", "pipeline"]

DATA_KINDS = ("train_loader", "calibration", "none")
GOALS = ("target_macs", "target_params", "ranks", "lam")


@dataclass(frozen=True)
class Pipeline:
    """What the CLI and the generic tests need to know about one pipeline.

    ``goals``: the CLI goals it accepts (a subset of ``GOALS``: ``--target-macs``,
    ``--target-params``, ``--ranks``, ``--lam``); ``from_goal`` maps the CLI's goal dict
    (one of those keys) to the entry function's keywords (identity when omitted).
    ``data``: ``train_loader`` (labelled batches ``(x, y)``), ``calibration`` (model
    inputs only) or ``none``. ``smoke``: the entry function's keywords for the generic tests'
    tiny runs (a goal, few steps, ``progress=False``); ``exact_counts``: whether
    ``plan.macs_after`` must equal the counted MACs of ``result.model`` (False only for a
    pipeline whose plan says why, e.g. a model that is no longer a sequence of layers).
    """

    name: str
    run: Callable[..., Any]
    summary: str
    goals: tuple[str, ...]
    data: str = "train_loader"
    smoke: Mapping[str, Any] = field(default_factory=dict)
    from_goal: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    exact_counts: bool = True

    def __post_init__(self) -> None:
        bad = [g for g in self.goals if g not in GOALS]
        if not self.goals or bad:
            raise ValueError(f"pipeline {self.name!r}: goals must be a non-empty subset of {GOALS}, got {self.goals}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"pipeline {self.name!r}: data must be one of {DATA_KINDS}, got {self.data!r}")

    def goal_kwargs(self, goal: Mapping[str, Any]) -> dict[str, Any]:
        """The entry function's keywords for a CLI goal such as ``{"target_macs": 0.25}``;
        ValueError naming the accepted goals for one this pipeline does not take."""
        unknown = [k for k in goal if k not in self.goals]
        if unknown:
            flags = ", ".join("--" + g.replace("_", "-") for g in self.goals)
            raise ValueError(f"--method {self.name} takes {flags}; got "
                             f"{', '.join('--' + k.replace('_', '-') for k in unknown)}")
        return self.from_goal(goal) if self.from_goal else dict(goal)


PIPELINES: dict[str, Pipeline] = {}


def register_pipeline(p: Pipeline) -> Pipeline:
    """Add ``p`` to :data:`PIPELINES` (a second registration of the same name must be the
    same entry function, so re-imports are harmless)."""
    old = PIPELINES.get(p.name)
    if old is not None and old.run is not p.run:
        raise ValueError(f"register_pipeline: {p.name!r} is already registered to {old.run!r}")
    PIPELINES[p.name] = p
    return p


def pipeline(name: str) -> Pipeline:
    """The registered pipeline ``name``; ValueError listing the known ones otherwise."""
    import tensorslim.methods  # noqa: F401 - importing the package registers every pipeline

    if name not in PIPELINES:
        close = difflib.get_close_matches(str(name), list(PIPELINES), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown pipeline {name!r}{hint}; known: {', '.join(sorted(PIPELINES)) or 'none'}")
    return PIPELINES[name]

"""Planning: :func:`make_plan`, public candidate pricing (the compressible layers of a model,
their rank spaces and what each rank costs) and the one registry of rank rules.

Every method prices ranks with these functions (``collect_layers``, ``rank_candidates``,
``layer_cost``, ``build_spec``), so a plan, a MUSCO stage and a future method agree on what a
rank costs; ``target_latency`` plans time the candidate ranks instead (:mod:`.latency`).
Data (:mod:`tensorslim.plan`) sits below this package; nothing here is imported by ``plan``,
``surgery``, ``layers``, ``rank`` or ``tensor``.
"""
from .candidates import (PlannedLayer, auto_method, build_spec, collect_layers, factorize, layer_cost,
                         layer_method, objective_index, rank_candidates, rank_space)
from .latency import LAYOUTS, LatencySettings, LatencyTable, LayerTimes, timing_ranks
from .latency_measure import measure_table
from .latency_cache import LatencyCache, cache_dir, machine_key
from .latency_timer import InterleavedTimer, TimingJob
from .planner import GOALS, OPTIONS, make_plan
from .ranks import energy_rank, fraction_rank, manual_rank, nearest_valid_rank
from .rule_base import RULES, PlanContext, RankRule, register
from .rules import (RULE_OPTIONS, AccuracyDrop, Constant, Energy, Manual, MinError, Uniform, VBMF,
                    goal_record, rule_from_goal)
from .vbmf import layer_vbmf_rank, vbmf_ranks_factorized

__all__ = ["make_plan", "GOALS", "OPTIONS", "PlannedLayer", "auto_method", "build_spec", "collect_layers",
           "factorize", "layer_cost", "layer_method", "objective_index", "rank_candidates", "rank_space",
           "energy_rank", "fraction_rank", "manual_rank", "nearest_valid_rank", "RULES", "RULE_OPTIONS",
           "PlanContext", "RankRule", "register", "Manual", "Uniform", "MinError", "Constant", "VBMF",
           "Energy", "AccuracyDrop", "goal_record", "rule_from_goal", "layer_vbmf_rank",
           "vbmf_ranks_factorized", "LAYOUTS", "LatencySettings", "LatencyTable", "LayerTimes", "measure_table",
           "timing_ranks", "LatencyCache", "cache_dir", "machine_key", "InterleavedTimer", "TimingJob"]

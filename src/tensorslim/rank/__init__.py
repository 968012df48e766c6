"""Pure rank choice: budgets (ranks for a whole-model params/MACs target), EVBMF, and the
rank-rule helpers (error proxies, constant rate, error-minimising budget, bisection)."""
from .budget import solve_budget
from .rules import constant_rate_index, error_proxies, min_error_allocation, smallest_passing, tail_energy
from .vbmf import DEFAULT_FACTOR, VBMFResult, evbmf, evbmf_rank, soften_rank, vbmf_ranks

__all__ = ["solve_budget", "DEFAULT_FACTOR", "VBMFResult", "evbmf", "evbmf_rank", "soften_rank", "vbmf_ranks",
           "tail_energy", "error_proxies", "constant_rate_index",
           "min_error_allocation", "smallest_passing"]

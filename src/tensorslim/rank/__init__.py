"""Pure rank choice: budgets (ranks for a whole-model params/MACs target)."""
from .budget import solve_budget

__all__ = ["solve_budget"]

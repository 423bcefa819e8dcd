"""The ``[planner]`` config section: how each step's sequence-parallel plan is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from parallel.configbase import fail

__all__ = ["PlannerConfig"]


@dataclass(kw_only=True)
class PlannerConfig:
    mode: Literal["flexsp", "static", "batch_adaptive"] = "flexsp"
    static_degree: int = 1
    """SP degree for mode = static (a power of two dividing the world size)."""
    cost_model: str = "auto"
    """A preset name, a cost-model JSON path, or auto (the preset for this model on this machine)."""
    solver: Literal["highs", "cbc"] = "highs"
    """MILP backend for micro-batches of at most 8 sequences (larger ones are planned combinatorially)."""
    time_limit_s: float = 1.0
    """Safety cap (s) on each small MILP; plans do not depend on it in practice (planner.solver)."""
    group_sizes: Literal["pow2", "any"] = "pow2"
    """SP group sizes: pow2 (buddy groups) or any (contiguous blocks of any size, on any world size)."""
    async_plan: bool = True
    """Plan step i+1 on rank 0 while step i trains."""

    def validate(self) -> None:
        d = self.static_degree
        if d < 1 or d & (d - 1):
            fail("planner.static_degree", d, "must be a power of two >= 1")
        if self.time_limit_s <= 0:
            fail("planner.time_limit_s", self.time_limit_s, "must be > 0 seconds")

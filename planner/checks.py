"""Input checks and the step-time lower bound shared by the planner and its baselines."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from planner.cost import CostModel, is_power_of_two

__all__ = ["StepBounds", "lower_bound_s", "step_bounds", "validate_batch"]

log = logging.getLogger("planner.solver")


def validate_batch(lengths: list[int], *, num_ranks: int, cost: CostModel, max_len_policy: str = "error") -> list[int]:
    """Check the inputs; return the indices to drop (policy 'drop'), or raise ValueError."""
    if not isinstance(cost, CostModel):
        raise ValueError(f"cost: expected a planner.cost.CostModel, got {type(cost).__name__}")
    if cost.group_sizes == "pow2" and not is_power_of_two(num_ranks):
        raise ValueError(
            f"num_ranks: got {num_ranks!r}; the planner's buddy groups need a power-of-two number of ranks "
            "(or group_sizes='any')"
        )
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks: got {num_ranks!r}; must be a positive integer")
    if max_len_policy not in ("error", "drop"):
        raise ValueError(f"max_len_policy: got {max_len_policy!r}; allowed: 'error', 'drop'")
    if isinstance(lengths, str | bytes | dict) or not hasattr(lengths, "__len__") or len(lengths) == 0:
        raise ValueError("lengths: the batch is empty or not a sequence; give a non-empty list of positive lengths")
    for i, s in enumerate(lengths):
        # numbers.Integral admits numpy integers; bool is an int but never a length.
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0:
            raise ValueError(f"lengths[{i}]: got {s!r}; sequence lengths must be positive integers")
    limit = cost.max_sequence_length(num_ranks)
    too_long = [i for i, s in enumerate(lengths) if s > limit]
    if too_long and max_len_policy == "error":
        i = too_long[0]
        raise ValueError(
            f"lengths[{i}] = {lengths[i]} tokens exceeds the longest sequence {num_ranks} ranks can hold "
            f"({limit} tokens under cost model {cost.name!r}); shorten it or use max_len_policy='drop'"
        )
    if len(too_long) == len(lengths):
        raise ValueError(f"every sequence exceeds the longest one {num_ranks} ranks can hold ({limit} tokens)")
    if too_long:
        log.warning("dropping %d sequence(s) longer than %d tokens: indices %s", len(too_long), limit, too_long)
    return too_long


def lower_bound_s(lengths: list[int], *, num_ranks: int, cost: CostModel) -> float:
    """A step time no plan can beat under the cost model (s).

    Every micro-batch keeps all N ranks busy for its makespan, and a sequence of length s
    occupies d ranks for at least t(s, d) on a degree-d group, so Σ_mb makespan ≥
    M·o_min + Σ_k min_d d·t(s_k, d) / N, with at least M_min = ⌈Σs / max_d (N/d)·κ_d⌉
    micro-batches (degrees d ≥ min_degree(s_k)). The step also lasts at least as long as its
    longest sequence alone: max_k min_d (o_d + t(s_k, d)).
    """
    return step_bounds(lengths, num_ranks, cost).at(None) / 1e3


@dataclass
class StepBounds:
    """The pieces of :func:`lower_bound_s` (ms), reused to prune micro-batch counts."""

    m_min: int
    overhead_ms: float
    work_ms: float
    longest_ms: float

    def at(self, m: int | None) -> float:
        """Lower bound (ms) on any plan with exactly m micro-batches (None: any number >= m_min)."""
        m = self.m_min if m is None else m
        return max(m * self.overhead_ms + self.work_ms, self.longest_ms)


def step_bounds(lengths: list[int], num_ranks: int, cost: CostModel) -> StepBounds:
    """The bounds of :func:`lower_bound_s`, vectorised over the distinct lengths."""
    degrees = cost.degrees(num_ranks)
    cluster = max(num_ranks // d * cost.token_capacity(d) for d in degrees)
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    rank_time = np.full(len(values), np.inf)
    alone = np.full(len(values), np.inf)
    for d in degrees:
        fits = values <= cost.token_capacity(d)
        t = cost.seq_times_ms(values, d)
        rank_time = np.where(fits, np.minimum(rank_time, d * t), rank_time)
        alone = np.where(fits, np.minimum(alone, cost.group_overhead_ms(d) + t), alone)
    return StepBounds(
        m_min=max(1, math.ceil(int(values @ counts) / cluster)),
        overhead_ms=min(cost.group_overhead_ms(d) for d in degrees),
        work_ms=float(rank_time @ counts) / num_ranks,
        longest_ms=float(alone.max()),
    )

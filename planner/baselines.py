"""Baseline plans: one SP degree for every sequence (DeepSpeed-Ulysses / Megatron-CP style) and
the best single degree per batch (FlexSP-BatchAda).

Packing, as in the FlexSP artefact's baselines: best-fit decreasing (BFD) by tokens into groups
of the degree's token capacity gives the fewest micro-batches M = ⌈bins / (N/d)⌉. Then, unlike
the artefact, the sequences are re-spread over those M·N/d groups by LPT on time (still within
memory) and the groups, sorted by time, fill micro-batches in order, which minimises Σ_mb max
for the given group times. This makes the baselines stronger, never weaker, than the artefact's.
"""

from __future__ import annotations

import math
import time

from planner.checks import lower_bound_s, validate_batch
from planner.cost import CostModel, is_power_of_two
from planner.packing import Packing, lpt_pack, place_groups
from planner.plan import Group, MicroBatch, StepPlan

__all__ = ["batch_adaptive", "best_fit_decreasing", "best_static_plan", "smallest_static_degree", "static_sp"]


def smallest_static_degree(lengths: list[int], *, num_ranks: int, cost: CostModel) -> int:
    """The smallest SP degree whose groups hold the longest sequence."""
    validate_batch(lengths, num_ranks=num_ranks, cost=cost)
    lengths = [int(s) for s in lengths]
    return cost.min_degree(max(lengths), num_ranks)


def static_sp(lengths: list[int], *, num_ranks: int, sp_degree: int, cost: CostModel) -> StepPlan:
    """Every sequence on groups of ``sp_degree`` ranks (module docstring for the packing)."""
    start = time.perf_counter()
    validate_batch(lengths, num_ranks=num_ranks, cost=cost)
    lengths = [int(s) for s in lengths]
    _check_degree(lengths, num_ranks, sp_degree, cost)
    plan = _static_plan(lengths, list(range(len(lengths))), num_ranks, sp_degree, cost)
    plan.solve_time_s = time.perf_counter() - start
    return plan


def batch_adaptive(lengths: list[int], *, num_ranks: int, cost: CostModel) -> StepPlan:
    """The fastest :func:`static_sp` plan over all degrees that hold the longest sequence."""
    start = time.perf_counter()
    validate_batch(lengths, num_ranks=num_ranks, cost=cost)
    lengths = [int(s) for s in lengths]
    best = best_static_plan(lengths, list(range(len(lengths))), num_ranks, cost)
    best.solve_time_s = time.perf_counter() - start
    return best


def best_static_plan(lengths: list[int], indices: list[int], num_ranks: int, cost: CostModel) -> StepPlan:
    """Batch-adaptive plan of the sequences ``indices`` (the others are left out, not dropped)."""
    lowest = cost.min_degree(max(lengths[i] for i in indices), num_ranks)
    # Choose the degree on plain LPT packings, then polish only the winner with the local search.
    degrees = [d for d in cost.degrees(num_ranks) if d >= lowest]
    rough = {d: _static_plan(lengths, indices, num_ranks, d, cost, improve=False).predicted_time_s for d in degrees}
    best = _static_plan(lengths, indices, num_ranks, min(degrees, key=lambda d: (rough[d], d)), cost)
    best.solver = "batch_adaptive"
    return best


def _check_degree(lengths: list[int], num_ranks: int, degree: int, cost: CostModel) -> None:
    if not is_power_of_two(degree):
        raise ValueError(f"sp_degree: got {degree!r}; must be a power of two")
    if degree > num_ranks:
        raise ValueError(f"sp_degree: got {degree}; must be <= num_ranks={num_ranks}")
    if cost.max_degree is not None and degree > cost.max_degree:
        raise ValueError(f"sp_degree: got {degree}; cost model {cost.name!r} allows at most {cost.max_degree}")
    longest = max(range(len(lengths)), key=lambda i: (lengths[i], -i))
    if lengths[longest] > cost.token_capacity(degree):
        raise ValueError(
            f"sp_degree={degree} is too small: lengths[{longest}] = {lengths[longest]} tokens exceeds the "
            f"{cost.token_capacity(degree)} tokens a group of {degree} ranks holds; use at least "
            f"{cost.min_degree(lengths[longest], num_ranks)}"
        )


def best_fit_decreasing(lengths: list[int], indices: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices by tokens: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        fitting = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fitting:
            b = min(fitting, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _static_plan(
    lengths: list[int], indices: list[int], num_ranks: int, degree: int, cost: CostModel, *, improve: bool = True
) -> StepPlan:
    """The static plan for one degree; ``improve=False`` skips the local search and the bound."""
    groups_per_mb = num_ranks // degree
    bins = best_fit_decreasing(lengths, indices, cost.token_capacity(degree))
    num_mb = math.ceil(len(bins) / groups_per_mb)
    local = {i: lengths[i] for i in indices}
    packing = lpt_pack({degree: num_mb * groups_per_mb}, {degree: list(local)}, local, cost, improve=improve)
    if packing is None:
        # LPT by time can miss a token packing that BFD found; keep BFD's bins then.
        packing = Packing([degree] * (num_mb * groups_per_mb), local, cost)
        for b, members in zip(packing.bins, bins):
            for i in members:
                packing.add(i, b)
    ordered = sorted(packing.bins, key=lambda b: (-packing.load(b), sorted(b.members)))
    ranks = place_groups([degree] * groups_per_mb)
    microbatches = []
    for m in range(num_mb):
        chunk = ordered[m * groups_per_mb : (m + 1) * groups_per_mb]
        groups = [Group(r, sorted(b.members)) for r, b in zip(ranks, chunk)]
        microbatches.append(MicroBatch(groups, max(packing.load(b) for b in chunk) / 1e3))
    return StepPlan(
        microbatches=microbatches,
        num_ranks=num_ranks,
        predicted_time_s=sum(mb.predicted_time_s for mb in microbatches),
        solver="static",
        solve_time_s=0.0,
        lower_bound_s=lower_bound_s([lengths[i] for i in indices], num_ranks=num_ranks, cost=cost) if improve else None,
    )

"""Baseline plans: one SP degree for every sequence (DeepSpeed-Ulysses / Megatron-CP style) and
the best single degree per batch (FlexSP-BatchAda).

Packing, as in the FlexSP artefact's baselines: best-fit decreasing (BFD) by tokens into groups
of the degree's token capacity gives the fewest micro-batches M = ⌈bins / (N/d)⌉. Then, unlike
the artefact, the sequences are re-spread over those M·N/d groups by LPT on time (still within
memory) and the groups, sorted by time, fill micro-batches in order, which minimises Σ_mb max
for the given group times. This makes the baselines stronger, never weaker, than the artefact's.
"""

from __future__ import annotations

import bisect
import math
import time

import numpy as np

from planner.checks import lower_bound_s, validate_batch
from planner.cost import CostModel, is_power_of_two
from planner.packing import Packing, TimeTable, lpt_pack, place_groups
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


def best_static_plan(
    lengths: list[int], indices: list[int], num_ranks: int, cost: CostModel, *, beat_ms: float | None = None
) -> StepPlan | None:
    """Batch-adaptive plan of the sequences ``indices`` (the others are left out, not dropped).

    ``beat_ms``: only a plan faster than this is wanted; None is returned when the bounds
    prove that no degree can be (the search is exact either way)."""
    lowest = cost.min_degree(max(lengths[i] for i in indices), num_ranks)
    # Choose the degree on plain LPT packings, then polish only the winner with the local search.
    # Degrees go in order of a lower bound on their plan (_static_bound_ms); once the bound
    # exceeds the best plain packing, no later degree can win.
    s_K = np.asarray([lengths[i] for i in indices], dtype=np.float64)
    degrees = sorted((_static_bound_ms(s_K, num_ranks, d, cost), d) for d in cost.degrees(num_ranks) if d >= lowest)
    if beat_ms is not None and degrees[0][0] >= beat_ms:
        return None
    table = TimeTable({i: lengths[i] for i in indices}, cost)
    winner, best_ms = degrees[0][1], None
    for bound, d in degrees:
        if best_ms is not None and bound > best_ms:
            break
        rough = _static_plan(lengths, indices, num_ranks, d, cost, improve=False, table=table).predicted_time_s * 1e3
        if best_ms is None or (rough, d) < (best_ms, winner):
            winner, best_ms = d, rough
    best = _static_plan(lengths, indices, num_ranks, winner, cost, table=table)
    best.solver = "batch_adaptive"
    return best


def _static_bound_ms(s_K: np.ndarray, num_ranks: int, degree: int, cost: CostModel) -> float:
    """No degree-``degree`` plan beats M·o_d + Σ t / (N/d) (every micro-batch's slowest group is at
    least its average), with M ≥ ⌈Σ s / (N/d · κ_d)⌉, nor o_d + max t."""
    groups = num_ranks // degree
    t_K = cost.seq_times_ms(s_K, degree)
    m_min = max(1, math.ceil(float(s_K.sum()) / (groups * cost.token_capacity(degree))))
    overhead = cost.group_overhead_ms(degree)
    return max(m_min * overhead + float(t_K.sum()) / groups, overhead + float(t_K.max()))


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
    """Bins of sequence indices by tokens: longest first, each into the fullest bin it fits
    (ties: the earliest bin). The open bins sit in a list sorted by (room, bin), so finding the
    fullest bin that fits is one binary search: O(K log B) plus the list's moves."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(rooms, (room - lengths[i], b))
    return bins


def _static_plan(
    lengths: list[int],
    indices: list[int],
    num_ranks: int,
    degree: int,
    cost: CostModel,
    *,
    improve: bool = True,
    table: TimeTable | None = None,
) -> StepPlan:
    """The static plan for one degree; ``improve=False`` skips the local search and the bound."""
    groups_per_mb = num_ranks // degree
    bins = best_fit_decreasing(lengths, indices, cost.token_capacity(degree))
    num_mb = math.ceil(len(bins) / groups_per_mb)
    local = table.lengths if table is not None else {i: lengths[i] for i in indices}
    counts = {degree: num_mb * groups_per_mb}
    packing = lpt_pack(counts, {degree: list(local)}, local, cost, improve=improve, table=table)
    if packing is None:
        # LPT by time can miss a token packing that BFD found; keep BFD's bins then.
        packing = Packing([degree] * (num_mb * groups_per_mb), local, cost, table)
        for b, members in zip(packing.bins, bins):
            for i in members:
                packing.add(i, b)
    ordered = sorted(packing.bins, key=lambda b: (-packing.load(b), sorted(b.members)))
    # Ranks past the last whole group (a degree that does not divide N) idle in one-rank groups.
    ranks = place_groups([degree] * groups_per_mb + [1] * (num_ranks - degree * groups_per_mb))
    microbatches = []
    for m in range(num_mb):
        chunk = ordered[m * groups_per_mb : (m + 1) * groups_per_mb]
        groups = [Group(r, sorted(b.members)) for r, b in zip(ranks, chunk)]
        groups += [Group(r, []) for r in ranks[groups_per_mb:]]
        microbatches.append(MicroBatch(groups, max(packing.load(b) for b in chunk) / 1e3))
    return StepPlan(
        microbatches=microbatches,
        num_ranks=num_ranks,
        predicted_time_s=sum(mb.predicted_time_s for mb in microbatches),
        solver="static",
        solve_time_s=0.0,
        lower_bound_s=lower_bound_s([lengths[i] for i in indices], num_ranks=num_ranks, cost=cost) if improve else None,
    )

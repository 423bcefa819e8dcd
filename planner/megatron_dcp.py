"""Megatron-core's dynamic context-parallel scheduler, reimplemented as a planner baseline.

Source: NVIDIA/Megatron-LM, branch ``dev`` at commit d48bd6be0a85cc0d6d3cc71e8750cf357cc6bdb1
(2026-08-21): ``DefaultDynamicCPScheduler.get_groups_and_subsamples`` in
megatron/core/datasets/data_schedule.py, which calls ``next_hdp_group_packing_aware`` and
``dcp_gpus_needed`` of megatron/core/datasets/data_schedule_utils.py
(``_DYNAMIC_CP_WORKLOAD_CAP_DELTA = 0.05``). Rewritten here from a reading of that code, with the
same decisions and tie-breaks; tests/test_planner_megatron.py holds cases traced by hand
through the source.

The algorithm, one micro-batch at a time over the sequences sorted by length (longest first,
stable), on N = DP×CP ranks with at most m tokens per rank (``--max-seqlen-per-dp-cp-rank``):

1. cp_min(s) = max(min_cp, 1, 2^⌈log2(s/m)⌉). The longest sequence opens a group of cp_min
   ranks on ranks 0…; every rank's workload is Σ s²/cp of what it runs (the only cost Megatron
   models), and the cap is 1.05·s_tall·m for the tallest sequence s_tall of the micro-batch.
2. Each further sequence tries every cp = cp_min(s), 2·cp_min, … ≤ N: joining an existing
   group of that size (in creation order) whose packed length Σ s/cp stays ≤ m, or opening a
   new group on the cp least-loaded free ranks (the lowest free ones). It takes the candidate
   with the least projected maximum rank workload, if that is ≤ the cap (the first one on ties);
   with none, it waits for a later micro-batch.
3. Idle ranks: while some rank is empty, one group of the smallest size (the first, in creation
   order, that can grow) doubles (capped at N) onto the ranks after it, pushing the later
   groups right. If none can, the micro-batch becomes one group of all N ranks holding the
   sequences (of all this micro-batch's candidates, longest first) that fit in m per rank;
   the others wait.

:func:`megatron_dynamic_cp` turns the groups into a StepPlan priced by a seqmoe cost model: m is
the largest per-rank token count that every allowed degree holds (min_d κ_d / d), so Megatron's
packing limit implies the cost model's memory, and groups are placed as buddy blocks (the cost
model does not depend on placement).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from planner.checks import lower_bound_s, validate_batch
from planner.cost import CostModel
from planner.packing import place_groups
from planner.plan import Group, MicroBatch, StepPlan

__all__ = ["MegatronGroup", "cp_min", "megatron_dynamic_cp", "schedule", "schedule_microbatch"]

WORKLOAD_CAP_DELTA = 0.05


def cp_min(length: int, max_seq_len_per_rank: int, min_cp_size: int = 1) -> int:
    """Megatron's dcp_gpus_needed: the next power of two of s/m (at least min_cp_size)."""
    return max(min_cp_size, max(1, 2 ** math.ceil(math.log2(length / max_seq_len_per_rank))))


@dataclass
class MegatronGroup:
    """One CP group of a micro-batch: its ranks (consecutive) and sample ids in arrival order."""

    ranks: list[int]
    ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    packed: float = 0.0
    """Σ s / cp: tokens per rank, against m."""
    load: float = 0.0
    """Σ s² / cp: the workload of each of its ranks."""

    @property
    def size(self) -> int:
        return len(self.ranks)


def schedule(
    samples: list[tuple[int, int]], total_ranks: int, max_seq_len_per_rank: int, min_cp_size: int = 1
) -> list[list[MegatronGroup]]:
    """DefaultDynamicCPScheduler.get_groups_and_subsamples: (id, length) pairs → micro-batches."""
    pending = sorted(samples, key=lambda x: x[1], reverse=True)
    microbatches = []
    while pending:
        groups, pending = schedule_microbatch(pending, total_ranks, max_seq_len_per_rank, min_cp_size)
        microbatches.append(groups)
    return microbatches


def schedule_microbatch(
    samples: list[tuple[int, int]], total_ranks: int, max_seq_len_per_rank: int, min_cp_size: int = 1
) -> tuple[list[MegatronGroup], list[tuple[int, int]]]:
    """next_hdp_group_packing_aware: one micro-batch's groups and the samples left for later."""
    m, n = max_seq_len_per_rank, total_ranks
    samples = sorted(samples, key=lambda x: x[1], reverse=True)
    tall = samples[0][1]
    cap = float(tall) * float(m) * (1.0 + WORKLOAD_CAP_DELTA)
    first_id, first_len = samples[0]
    size = cp_min(first_len, m, min_cp_size)
    if size > n:
        raise ValueError(f"a sequence of {first_len} tokens needs CP size {size}, more than the {n} ranks")
    groups = [MegatronGroup(list(range(size)))]
    _add(groups[0], first_id, first_len)
    # Groups of each size in creation order: the order the source scans them in.
    by_size = {size: [groups[0]]}
    # The largest workload outside each group comes from the two largest loads (the values
    # source's max over the other groups gives), kept up to date as loads grow, not rescanned.
    top, top_group, second = _top_two_loads(groups)
    next_free = size  # free ranks are always the tail: groups take the lowest free ranks
    leftovers = []
    for sample_id, length in samples[1:]:
        best = None
        size = cp_min(length, m, min_cp_size)
        while size <= n:
            cost = length * length / size
            for g in by_size.get(size, ()):
                if g.packed + length / size > m:
                    continue
                projected = max(g.load + cost, second if g is top_group else top)
                if projected <= cap and (best is None or projected < best[0]):
                    best = (projected, size, g)
            if n - next_free >= size:
                # the new group's ranks have no load yet: the projection is max(cost, current max)
                projected = max(cost, top)
                if projected <= cap and (best is None or projected < best[0]):
                    best = (projected, size, None)
            size *= 2
        if best is None:
            leftovers.append((sample_id, length))
            continue
        _, size, target = best
        if target is None:
            target = MegatronGroup(list(range(next_free, next_free + size)))
            groups.append(target)
            by_size.setdefault(size, []).append(target)
            next_free += size
        _add(target, sample_id, length)
        if target is top_group:
            top = target.load
        elif target.load > top:
            top, top_group, second = target.load, target, top
        else:
            second = max(second, target.load)
    while next_free < n:
        if not _grow_smallest(groups, n):
            return _whole_world(samples, n, m)
        next_free = max(g.ranks[-1] for g in groups) + 1
    return groups, leftovers


def _add(group: MegatronGroup, sample_id: int, length: int) -> None:
    group.ids.append(sample_id)
    group.lengths.append(length)
    group.packed += length / group.size
    group.load += length * length / group.size


def _top_two_loads(groups: list[MegatronGroup]) -> tuple[float, MegatronGroup | None, float]:
    """(largest load, the first group that has it, largest load of the other groups)."""
    top, top_group, second = 0.0, None, 0.0
    for g in groups:
        if top_group is None or g.load > top:
            if top_group is not None:
                second = max(second, top)
            top, top_group = g.load, g
        else:
            second = max(second, g.load)
    return top, top_group, second


def _grow_smallest(groups: list[MegatronGroup], n: int) -> bool:
    """fill_empty_gpus_once: double the first smallest group that can grow, shifting later groups."""
    smallest = min(g.size for g in groups)
    grown = min(2 * smallest, n)
    needed = grown - smallest
    first_empty = max(g.ranks[-1] for g in groups) + 1
    for g in groups:
        if g.size != smallest:
            continue
        end = g.ranks[-1]
        if end + 1 > first_empty or end + needed >= n:
            continue
        for other in groups:
            if other is not g and min(other.ranks) > end:
                other.ranks = [r + needed for r in other.ranks]
        g.ranks = list(range(g.ranks[0], end + needed + 1))
        # Megatron re-sums the rank's workload at the new size (not the old total halved).
        g.load = sum(length * length / grown for length in g.lengths)
        return True
    return False


def _whole_world(samples, n: int, m: int) -> tuple[list[MegatronGroup], list[tuple[int, int]]]:
    """fill_with_full_dpxcp_group: one group of all ranks, longest first while Σ s/N ≤ m."""
    group = MegatronGroup(list(range(n)))
    leftovers, packed = [], 0.0
    for sample_id, length in samples:
        if packed + length / n <= m:
            group.ids.append(sample_id)
            group.lengths.append(length)
            packed += length / n
        else:
            leftovers.append((sample_id, length))
    if not group.ids:
        raise ValueError(f"no sequence fits in the full group of {n} ranks at {m} tokens per rank")
    group.packed = packed
    group.load = sum(length * length / n for length in group.lengths)
    return [group], leftovers


def max_tokens_per_rank(cost: CostModel, num_ranks: int) -> int:
    """The m for which Megatron's packing limit implies the cost model's memory at every degree."""
    return min(cost.token_capacity(d) // d for d in cost.degrees(num_ranks))


def megatron_dynamic_cp(lengths: list[int], *, num_ranks: int, cost: CostModel, min_cp_size: int = 1) -> StepPlan:
    """Megatron-core's dynamic-CP plan of a batch, priced by ``cost`` (solver 'megatron_dcp').

    Raises ValueError when a group Megatron forms is larger than the cost model allows."""
    start = time.perf_counter()
    validate_batch(lengths, num_ranks=num_ranks, cost=cost)
    lengths = [int(s) for s in lengths]
    m = max_tokens_per_rank(cost, num_ranks)
    microbatches = []
    for groups in schedule(list(enumerate(lengths)), num_ranks, m, min_cp_size):
        layout = sorted(groups, key=lambda g: -g.size)
        ranks = place_groups([g.size for g in layout])
        members = [Group(r, sorted(g.ids)) for r, g in zip(ranks, layout)]
        times = [cost.group_time_ms([lengths[i] for i in g.seq_indices], g.degree) for g in members]
        members.sort(key=lambda g: g.ranks[0])
        microbatches.append(MicroBatch(members, max(times) / 1e3))
    plan = StepPlan(
        microbatches=microbatches,
        num_ranks=num_ranks,
        predicted_time_s=sum(mb.predicted_time_s for mb in microbatches),
        solver="megatron_dcp",
        solve_time_s=0.0,
        lower_bound_s=lower_bound_s(lengths, num_ranks=num_ranks, cost=cost),
    )
    plan.validate(lengths, cost)
    plan.solve_time_s = time.perf_counter() - start
    return plan

"""Micro-batches by dealing: the longest sequences round-robin over the M micro-batches, then
LPT on rank-time under each micro-batch's memory.

The length-sorted consecutive cut (planner.bucketing.cut_microbatches) puts the longest
sequences together in the last micro-batches. When memory binds, those micro-batches hold few
tokens (the large groups they need hold fewer tokens per rank) and the short ones pile up in
the others, so more micro-batches are needed and their loads differ. Dealing spreads them:

- every sequence has a home degree h(s), the allowed degree of least rank-time h·t(s, h)
  whose group holds it (ties: the smaller), a rank-time r(s) = h·t(s, h), and a memory share
  q(s) = s·h / κ_h, the ranks its tokens fill at that degree;
- longest first (ties by index), each sequence goes to the micro-batch of least rank-time R_m
  (ties: the lower index) whose memory share stays within N: Q_m + q(s) ≤ N. The first M go
  to M different micro-batches, the longest one each, and the rest fill the lightest.

That is Graham's LPT on the rank-time, so the micro-batches' average rank loads R_m / N are
within one sequence of each other; the pooled memory share is a relaxation (groups are
integral), and every micro-batch is then planned and checked for real (planner.solver).
No clock, no randomness: the result is a function of the lengths alone.
"""

from __future__ import annotations

import heapq

import numpy as np

from planner.baselines import best_fit_decreasing
from planner.cost import CostModel
from planner.megatron_dcp import max_tokens_per_rank, schedule

__all__ = ["deal_microbatches", "home_degrees", "memory_bound_memberships"]

# Dealt memberships into this many fewer micro-batches than Megatron's scheduler forms
# (0, 1 and 2 fewer were the best counts on the measured tiny-cpu batches).
DEAL_BELOW = (0, 1, 2)

Membership = list[list[int]]
OwnGroups = list[tuple[list[tuple[int, list[int]]], float]]


def home_degrees(s_K: np.ndarray, num_ranks: int, cost: CostModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, r, q) per sequence: home degree, its rank-time (ms) and memory share (ranks)."""
    best_r = np.full(len(s_K), np.inf)
    best_d = np.zeros(len(s_K), dtype=np.int64)
    best_kappa = np.ones(len(s_K))
    for d in cost.degrees(num_ranks):
        kappa = cost.token_capacity(d)
        r = d * cost.seq_times_ms(s_K, d)
        # Strictly less: ties keep the smaller degree (degrees ascend).
        better = (s_K <= kappa) & (r < best_r)
        best_r = np.where(better, r, best_r)
        best_d = np.where(better, d, best_d)
        best_kappa = np.where(better, kappa, best_kappa)
    return best_d, best_r, s_K * best_d / best_kappa


def deal_microbatches(
    seqs: list[int], lengths: list[int], num_microbatches: int, num_ranks: int, cost: CostModel
) -> list[list[int]] | None:
    """Sequence indices per micro-batch (module docstring); None when some sequence finds no
    micro-batch with memory room. ``seqs`` in any order; each list comes back in dealing order."""
    m = num_microbatches
    order = sorted(seqs, key=lambda i: (-lengths[i], i))
    s_K = np.asarray([lengths[i] for i in order], dtype=np.float64)
    _, r_K, q_K = home_degrees(s_K, num_ranks, cost)
    room = np.full(m, float(num_ranks))
    members: list[list[int]] = [[] for _ in range(m)]
    heap = [(0.0, j) for j in range(m)]
    for k, seq in enumerate(order):
        need = float(q_K[k])
        skipped = []
        while heap and room[heap[0][1]] + 1e-9 < need:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        load, j = heap[0]
        members[j].append(seq)
        room[j] -= need
        heapq.heapreplace(heap, (load + float(r_K[k]), j))
        for item in skipped:
            heapq.heappush(heap, item)
    if any(not group for group in members):
        return None
    return members


def memory_bound_memberships(
    kept: list[int], lengths: list[int], num_ranks: int, cost: CostModel
) -> list[tuple[Membership, OwnGroups | None]]:
    """Candidate micro-batch memberships of a memory-bound batch, each with (for Megatron's)
    the groups and makespan (ms) its source gives every micro-batch, else None.

    1. Megatron-core's dynamic-CP scheduler (planner.megatron_dcp): longest first, each
       micro-batch filled to its per-rank token limit under a workload cap. Its memberships
       are a strong start; its own groups stay candidates per micro-batch, so the plan is
       never slower than Megatron's. Skipped where it cannot schedule the batch (a sequence
       beyond its per-rank limit on all ranks, groups beyond the cost model's max_degree).
    2. The deal of this module into DEAL_BELOW fewer micro-batches than that (or than the
       best-fit-decreasing count at the same per-rank limit, without 1).
    """
    m = max_tokens_per_rank(cost, num_ranks)
    result: list[tuple[Membership, OwnGroups | None]] = []
    count = None
    try:
        scheduled = schedule([(i, lengths[i]) for i in kept], num_ranks, m) if m > 0 else None
    except ValueError:
        scheduled = None
    if scheduled is not None:
        own = []
        for groups in scheduled:
            layout = [(g.size, sorted(g.ids)) for g in groups]
            ok = all(cost.fits([lengths[i] for i in seqs], d) for d, seqs in layout)
            own.append((layout, max(cost.group_time_ms([lengths[i] for i in seqs], d) for d, seqs in layout)))
            if not ok:
                own = None
                break
        result.append(([[i for g in groups for i in g.ids] for groups in scheduled], own))
        count = len(scheduled)
    if count is None:
        capacity = max(m * num_ranks, max(lengths[i] for i in kept))
        count = len(best_fit_decreasing(lengths, kept, capacity))
    for below in DEAL_BELOW:
        dealt = deal_microbatches(kept, lengths, max(1, count - below), num_ranks, cost)
        if dealt is not None:
            result.append((dealt, None))
    return result

"""plan_step: one global batch of sequence lengths → a StepPlan (FlexSP Algorithm 1, refined).

1. Micro-batches. β is paid per micro-batch, so use few: from M_min = ⌈Σs / cluster token
   capacity⌉ try M = M_min … M_min + extra_microbatches, cut the
   length-sorted batch into M consecutive token-balanced slices (planner.bucketing), solve each
   slice and keep the M with the least predicted time. An M whose lower bound M·β + work/N
   already exceeds the best total is skipped. When memory binds (none of those cuts is
   feasible: the micro-batches of the longest sequences need large groups that hold few
   tokens per rank), the consecutive cut is the wrong shape, and the candidates are instead
   memberships that spread the long sequences (planner.dealing): Megatron-core's scheduler's
   (its own groups stay candidates per micro-batch, so the plan is never slower than
   Megatron's) and the longest sequences dealt round-robin over that many micro-batches and
   up to two fewer, then filled by LPT on rank-time. Each such micro-batch gets the best
   homogeneous packing (and, when small, the neighbouring tilings); with groups of any size
   the first feasible cut beyond M_min + extra is a candidate too (a long sequence then
   needs only part of the cluster). The micro-batch of the longest sequences is solved first
   and a cheap necessary memory condition is checked before any, so an infeasible candidate
   costs almost nothing.
2. Per micro-batch, the best of these candidates under the cost model:
   - the combinatorial plan (planner.moldable: bisection on the makespan over the pooled rank
     demand, then LPT packing and local search; planner.packing);
   - the best homogeneous packing of the slice;
   - for slices of at most _MILP_MAX_SEQS sequences and at most _MILP_MAX_DEGREES allowed
     degrees, the degree-count MILP (planner.milp; HiGHS, CBC if HiGHS errors out) with one
     sequence per bucket, packed the same way.
   Slices of at most _REFINE_MAX_SEQS sequences also try the tilings next to the winner's.
3. The best single-degree plan of the whole batch (planner.baselines.batch_adaptive) is the
   last candidate: consecutive cuts can need more micro-batches than free packing when memory
   binds. If it wins, the plan says solver 'batch_adaptive'.
4. Placement: groups largest first on consecutive ranks, so every group is a buddy block.

Determinism: every step is a fixed amount of work (bisection to a relative tolerance, bounded
local-search rounds, MILPs bounded by a node limit) with stable sorts and index tie-breaks, so
the plan of a batch never depends on the machine's load. ``time_limit_s`` is only a safety cap
on each small MILP (they take milliseconds); a MILP stopped by it is logged, the only case in
which a plan could depend on timing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from planner.baselines import best_static_plan
from planner.bucketing import cut_microbatches, optimal_buckets, sorted_order
from planner.checks import lower_bound_s, step_bounds, validate_batch
from planner.cost import CostModel
from planner.dealing import memory_bound_memberships
from planner.milp import DEFAULT_MIP_GAP, MilpResult, MilpSolveError, available_solvers, solve_milp
from planner.moldable import DemandModel, moldable_packing
from planner.packing import Packing, TimeTable, homogeneous_packing, lpt_pack, place_groups, refine_tiling
from planner.plan import Group, MicroBatch, StepPlan

__all__ = ["lower_bound_s", "plan_step", "validate_batch"]

log = logging.getLogger(__name__)

# Micro-batches with at most this many sequences also get the MILP, one sequence per bucket
# (exact in its pooled model; milliseconds at this size), when there are at most
# _MILP_MAX_DEGREES allowed degrees (groups of any size on many ranks make the MILP slow).
_MILP_MAX_SEQS = 8
_MILP_MAX_DEGREES = 8
# Micro-batches with at most this many sequences also try the tilings next to the winner's
# (planner.packing.refine_tiling); in larger ones per-degree pooling is accurate anyway.
_REFINE_MAX_SEQS = 16


@dataclass
class _Slice:
    """The planned micro-batch: (degree, sequence indices) per group and its makespan."""

    groups: list[tuple[int, list[int]]]
    makespan_ms: float
    milp_failed: bool
    by_milp: bool = False


def plan_step(
    lengths: list[int],
    *,
    num_ranks: int,
    cost: CostModel,
    time_limit_s: float = 1.0,
    solver: str = "highs",
    num_buckets: int = 16,
    extra_microbatches: int = 3,
    max_len_policy: str = "error",
    mip_gap: float = DEFAULT_MIP_GAP,
    group_sizes: str | None = None,
) -> StepPlan:
    """Plan one step: micro-batches of SP groups of mixed power-of-two degrees (module docstring).

    ``time_limit_s``: safety cap (s) on each small MILP; it never binds in practice, and the
    combinatorial planner has no clock at all. ``solver``: the MILP backend for small slices,
    'highs' or 'cbc'. ``max_len_policy``: 'error' raises on a sequence no group can hold;
    'drop' leaves it out and lists it in ``StepPlan.dropped``. ``mip_gap``: relative
    optimality gap of each MILP. ``group_sizes``: 'pow2' (buddy groups) or 'any' (contiguous
    groups of any size, on any number of ranks); None keeps the cost model's (default 'pow2').
    """
    start = time.perf_counter()
    if group_sizes is not None:
        if group_sizes not in ("pow2", "any"):
            raise ValueError(f"group_sizes: got {group_sizes!r}; allowed: 'pow2', 'any'")
        if isinstance(cost, CostModel):
            cost = dataclasses.replace(cost, group_sizes=group_sizes)
    dropped = validate_batch(lengths, num_ranks=num_ranks, cost=cost, max_len_policy=max_len_policy)
    lengths = [int(s) for s in lengths]
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s: got {time_limit_s}; must be > 0 seconds")
    if num_buckets < 1 or extra_microbatches < 0:
        raise ValueError("num_buckets must be >= 1 and extra_microbatches >= 0")
    if not 0 <= mip_gap < 1:
        raise ValueError(f"mip_gap: got {mip_gap}; must be in [0, 1)")
    skip = set(dropped)
    kept = [i for i in sorted_order(lengths) if i not in skip]
    search = _Search(lengths, num_ranks, cost, _pick_solver(solver), num_buckets, mip_gap, time_limit_s)
    found = search.run(kept, extra_microbatches)
    # Nothing feasible (memory-bound beyond every partition tried): the batch-adaptive plan.
    slices, total_ms = found if found is not None else ([], math.inf)
    plan = StepPlan(
        microbatches=[_to_microbatch(s, num_ranks) for s in slices],
        num_ranks=num_ranks,
        predicted_time_s=total_ms / 1e3,
        solver=search.backend if any(s.by_milp for s in slices) else "combinatorial",
        solve_time_s=0.0,
        lower_bound_s=lower_bound_s([lengths[i] for i in kept], num_ranks=num_ranks, cost=cost),
        dropped=dropped,
        group_sizes=cost.group_sizes,
    )
    # Step 3 of the module docstring.
    fallback = best_static_plan(
        lengths, kept, num_ranks, cost, beat_ms=None if found is None else plan.predicted_time_s * 1e3
    )
    if fallback is not None and fallback.predicted_time_s < plan.predicted_time_s:
        fallback.dropped = dropped
        fallback.lower_bound_s = plan.lower_bound_s
        fallback.group_sizes = cost.group_sizes
        plan = fallback
    plan.solve_time_s = time.perf_counter() - start
    return plan


def _pick_solver(solver: str) -> str:
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver: got {solver!r}; allowed: 'highs', 'cbc'")
    found = available_solvers()
    if solver in found:
        return solver
    if found:
        log.warning("MILP solver %r is not available; using %r", solver, found[0])
        return found[0]
    log.info("no MILP solver available (install highspy); small micro-batches are planned combinatorially")
    return "none"


class _Search:
    """The step's fixed inputs, shared by every micro-batch solve."""

    def __init__(self, lengths, num_ranks, cost, backend, num_buckets, mip_gap, time_limit_s):
        self.lengths, self.num_ranks, self.cost = lengths, num_ranks, cost
        self.backend, self.num_buckets, self.mip_gap = backend, num_buckets, mip_gap
        self.time_limit_s = time_limit_s
        self.available = available_solvers()
        self.use_milp = backend != "none"
        self.memory_bound = False
        self._capacity: list[tuple[int, int, float]] | None = None

    def run(self, kept: list[int], extra: int) -> tuple[list[_Slice], float] | None:
        """Try M = M_min … M_min + extra consecutive cuts; when memory binds (none of them is
        feasible), the memberships of planner.dealing instead; keep the fastest. None only if
        nothing is feasible (plan_step then keeps the batch-adaptive plan)."""
        bound = step_bounds([self.lengths[i] for i in kept], self.num_ranks, self.cost)
        best: tuple[list[_Slice], float] | None = None
        for m in range(bound.m_min, min(bound.m_min + extra, len(kept)) + 1):
            if best is not None and bound.at(m) >= best[1]:
                break
            best = self._keep_best(best, self.solve_cut(kept, m, None if best is None else best[1]))
        memory_bound = best is None
        if memory_bound and self.cost.group_sizes == "any":
            # Groups of any size hold a long sequence on part of the cluster (a 15K-token one
            # on 40 of 64 ranks, not all 64), so a consecutive cut a little beyond M_min + extra
            # is often feasible and mixes degrees well: the first feasible one is a candidate.
            for m in range(bound.m_min + extra + 1, len(kept) + 1):
                best = self._keep_best(best, self.solve_cut(kept, m, None))
                if best is not None:
                    break
        if memory_bound:
            found = self._memory_bound(kept)
            if found is not None and (best is None or found[1] < best[1]):
                best = found
        return best

    def _memory_bound(self, kept: list[int]) -> tuple[list[_Slice], float] | None:
        """Tens of micro-batches, each of one tight memory: per micro-batch the best
        homogeneous packing (with the neighbouring tilings of small ones), which is what wins
        there; the pooled-demand plan and the small-slice MILP would cost tens of ms each and
        were never better on the measured batches (benchmarks/RESULTS.md)."""
        self.use_milp, self.memory_bound = False, True
        best = None
        for members, own in memory_bound_memberships(kept, self.lengths, self.num_ranks, self.cost):
            best = self._keep_best(best, self.solve_members(members, None if best is None else best[1], own))
        return best

    @staticmethod
    def _keep_best(best, slices):
        if slices is None:
            return best
        total = sum(s.makespan_ms for s in slices)
        return (slices, total) if best is None or total < best[1] else best

    def solve_cut(self, kept: list[int], m: int, beat_ms: float | None) -> list[_Slice] | None:
        """Solve every slice of the M-way token-balanced cut (see solve_members)."""
        cut = cut_microbatches([self.lengths[i] for i in kept], m)
        return self.solve_members([kept[lo:hi] for lo, hi in cut], beat_ms)

    def solve_members(self, members: list[list[int]], beat_ms: float | None, own=None) -> list[_Slice] | None:
        """Solve every micro-batch; None if one is infeasible, or once the micro-batches solved
        plus the lower bounds of the rest cannot beat ``beat_ms``. ``own``: per micro-batch,
        groups and makespan (ms) known to be feasible (Megatron's), kept where faster."""
        if not all(self._may_fit(seqs) for seqs in members):
            return None
        bounds = [DemandModel(seqs, self.lengths, self.num_ranks, self.cost).lower_bound_ms() for seqs in members]
        slices: list[_Slice | None] = [None] * len(members)
        done_ms, left_ms = 0.0, sum(bounds)
        # The micro-batch of the longest sequences first: it is the one memory makes infeasible,
        # so a cut that fails fails before the others are solved (the result is order-free).
        for j in sorted(range(len(members)), key=lambda j: (-max(self.lengths[i] for i in members[j]), j)):
            left_ms -= bounds[j]
            if beat_ms is not None and done_ms + left_ms + bounds[j] >= beat_ms:
                return None
            planned = self.solve_slice(members[j], bounds[j])
            if own is not None and (planned is None or own[j][1] < planned.makespan_ms):
                planned = _Slice(own[j][0], own[j][1], False)
            if planned is None:
                return None
            slices[j] = planned
            done_ms += planned.makespan_ms
        return slices

    def _may_fit(self, seqs: list[int]) -> bool:
        """A necessary condition for a micro-batch to fit in memory: its tokens fit in the group
        of its longest sequence (degree d ≥ the least that holds it) plus the other N − d ranks
        at the best tokens per rank of any degree. False proves it infeasible (cheaply)."""
        if self._capacity is None:
            degrees = self.cost.degrees(self.num_ranks)
            per_rank = max(self.cost.token_capacity(d) / d for d in degrees)
            self._capacity = [(self.cost.token_capacity(d), d, per_rank) for d in degrees]
        longest = max(self.lengths[i] for i in seqs)
        tokens = sum(self.lengths[i] for i in seqs)
        room = max(
            (kappa + (self.num_ranks - d) * per_rank for kappa, d, per_rank in self._capacity if kappa >= longest),
            default=-1.0,
        )
        return tokens <= room * (1 + 1e-12)

    def _solve_milp(self, buckets: list[list[int]]) -> MilpResult:
        """The chosen solver, then CBC if that one errors out (not if it proves infeasibility)."""
        try:
            return self._solve_with(self.backend, buckets)
        except MilpSolveError as exc:
            if exc.kind != "error" or self.backend == "cbc" or "cbc" not in self.available:
                raise
            log.warning("%s; retrying with CBC", exc)
            return self._solve_with("cbc", buckets)

    def _solve_with(self, solver: str, buckets: list[list[int]]) -> MilpResult:
        result = solve_milp(
            buckets,
            num_ranks=self.num_ranks,
            cost=self.cost,
            time_limit_s=self.time_limit_s,
            solver=solver,
            mip_gap=self.mip_gap,
        )
        if result.stopped_by_clock:
            log.warning("MILP stopped at its %.3f s safety cap; this plan may differ between runs", self.time_limit_s)
        return result

    def _milp_packing(self, seqs: list[int], local: dict[int, int], table: TimeTable) -> tuple[Packing | None, bool]:
        """(packing of the MILP's counts, whether the MILP failed)."""
        buckets = optimal_buckets([local[i] for i in seqs], self.num_buckets)
        members = [[seqs[k] for k in indices] for _, indices in buckets]
        try:
            result = self._solve_milp([[local[i] for i in m] for m in members])
        except MilpSolveError as exc:
            if exc.kind != "infeasible":
                log.warning("MILP failed (%s); planning this micro-batch combinatorially", exc)
            return None, exc.kind != "infeasible"
        by_degree = _split_buckets(members, result.assignment, local)
        return lpt_pack(result.counts, by_degree, local, self.cost, table=table), False

    def solve_slice(self, seqs: list[int], bound_ms: float) -> _Slice | None:
        """The best of the combinatorial, homogeneous and (small slices) MILP packings."""
        local = {i: self.lengths[i] for i in seqs}
        table = TimeTable(local, self.cost)
        moldable = None if self.memory_bound else moldable_packing(seqs, local, self.num_ranks, self.cost, table=table)
        # A combinatorial plan at the slice's lower bound is optimal: nothing else can beat it.
        if moldable is not None and moldable.makespan_ms() <= bound_ms * (1 + 1e-12):
            return _Slice(moldable.groups(), moldable.makespan_ms(), False, False)
        beat = None if moldable is None else moldable.makespan_ms()
        found = (moldable, _best_homogeneous(seqs, local, self.num_ranks, self.cost, table, beat_ms=beat))
        candidates = [(p, False) for p in found if p is not None]
        failed = False
        small = len(seqs) <= _MILP_MAX_SEQS and len(self.cost.degrees(self.num_ranks)) <= _MILP_MAX_DEGREES
        if small and self.use_milp:
            packing, failed = self._milp_packing(seqs, local, table)
            if packing is not None:
                candidates.append((packing, True))
        if not candidates:
            return None
        # min keeps the first of equal makespans: the MILP wins only when strictly better.
        best, by_milp = min(candidates, key=lambda c: c[0].makespan_ms())
        if len(seqs) <= _REFINE_MAX_SEQS:
            best = refine_tiling(best, self.num_ranks)
        return _Slice(best.groups(), best.makespan_ms(), failed, by_milp)


def _split_buckets(members, assignment, local) -> dict[int, list[int]]:
    """x_{q,d} sequences of bucket q to degree d, the longest ones to the largest degrees."""
    by_degree: dict[int, list[int]] = {}
    for q, seqs in enumerate(members):
        queue = sorted(seqs, key=lambda i: (-local[i], i))
        for d in sorted({d for (qq, d) in assignment if qq == q}, reverse=True):
            take = assignment[q, d]
            by_degree.setdefault(d, []).extend(queue[:take])
            queue = queue[take:]
    return by_degree


def _best_homogeneous(
    seqs, local, num_ranks, cost, table: TimeTable | None = None, *, beat_ms: float | None = None
) -> Packing | None:
    """The fastest single-degree packing of a micro-batch (None if no degree holds it, or if
    none can beat ``beat_ms``).

    Degrees are tried in order of their bound o_d + max(max t, Σ t / (N/d)) and the search
    stops once that bound cannot beat the best LPT packing (or ``beat_ms``); only the winner
    gets the local search.
    """
    table = table if table is not None else TimeTable(local, cost)
    lowest = cost.min_degree(max(local[i] for i in seqs), num_ranks)
    s_K = np.asarray([local[i] for i in seqs], dtype=np.float64)
    bounds = []
    for d in cost.degrees(num_ranks):
        if d >= lowest:
            t_K = cost.seq_times_ms(s_K, d)
            bounds.append((cost.group_overhead_ms(d) + max(float(t_K.max()), float(t_K.sum()) / (num_ranks // d)), d))
    best = None
    for bound, d in sorted(bounds):
        if best is not None and bound >= best.makespan_ms() or beat_ms is not None and bound >= beat_ms:
            break
        packing = homogeneous_packing(seqs, d, num_ranks, local, cost, improve=False, table=table)
        if packing is not None and (best is None or packing.makespan_ms() < best.makespan_ms()):
            best = packing
    if best is not None:
        best.improve()
    return best


def _to_microbatch(planned: _Slice, num_ranks: int) -> MicroBatch:
    # Ranks no group covers (degrees that do not divide N) idle in one-rank groups.
    spare = num_ranks - sum(d for d, _ in planned.groups)
    layout = planned.groups + [(1, [])] * spare
    ranks = place_groups([d for d, _ in layout])
    groups = [Group(r, seqs) for r, (_, seqs) in zip(ranks, layout)]
    groups.sort(key=lambda g: g.ranks[0])
    return MicroBatch(groups, planned.makespan_ms / 1e3)

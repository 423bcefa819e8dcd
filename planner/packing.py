"""From degree counts to concrete SP groups: LPT packing under memory, local search, placement.

A group's time is additive, T = o_d + Σ t(s, d) (planner.cost), and so is its memory, so
moving one sequence between two groups changes only those two groups: the local search below
evaluates moves and swaps in O(1) each.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from planner.cost import CostModel

__all__ = ["Packing", "TimeTable", "greedy_pack", "homogeneous_packing", "lpt_pack", "place_groups", "refine_tiling"]

# Relative improvement below which the local search stops (float noise, not progress).
_TOL = 1e-9
# Swaps tried per round: this many of the slowest group's longest sequences, lightest groups,
# and their shortest sequences.
_SWAP_WIDTH = 8
# Local-search work budget: rounds x groups. A round scans every group, and with thousands of
# groups many sit near the maximum, so a round there buys little; the budget keeps the work
# (and the result) a function of the input alone.
_ROUND_BUDGET = 25_000


class TimeTable:
    """t(s, d) of every sequence of a micro-batch, computed once per degree (vectorised)."""

    def __init__(self, lengths: dict[int, int], cost: CostModel):
        self.lengths, self.cost = lengths, cost
        self._seqs = list(lengths)
        self._s = np.asarray([lengths[i] for i in self._seqs], dtype=np.float64)
        self._by_degree: dict[int, dict[int, float]] = {}

    def of(self, degree: int) -> dict[int, float]:
        """Sequence index -> t(s, degree) in ms."""
        table = self._by_degree.get(degree)
        if table is None:
            table = dict(zip(self._seqs, self.cost.seq_times_ms(self._s, degree).tolist()))
            self._by_degree[degree] = table
        return table


@dataclass
class _Bin:
    degree: int
    capacity: int
    members: list[int] = field(default_factory=list)
    tokens: int = 0
    work_ms: float = 0.0


class Packing:
    """Groups (degree + sequence indices) of one micro-batch, with incremental times."""

    def __init__(self, degrees: list[int], lengths: dict[int, int], cost: CostModel, table: TimeTable | None = None):
        self.cost = cost
        self.lengths = lengths
        self.table = table if table is not None and table.lengths is lengths else TimeTable(lengths, cost)
        capacity = {d: cost.token_capacity(d) for d in set(degrees)}
        self.bins = [_Bin(d, capacity[d]) for d in degrees]
        self._overhead = {d: cost.group_overhead_ms(d) for d in set(degrees)}

    def seq_time(self, seq: int, degree: int) -> float:
        return self.table.of(degree)[seq]

    def load(self, b: _Bin) -> float:
        return self._overhead[b.degree] + b.work_ms if b.members else 0.0

    def makespan_ms(self) -> float:
        return max((self.load(b) for b in self.bins), default=0.0)

    def fits(self, seq: int, b: _Bin) -> bool:
        return b.tokens + self.lengths[seq] <= b.capacity

    def add(self, seq: int, b: _Bin) -> None:
        b.members.append(seq)
        b.tokens += self.lengths[seq]
        b.work_ms += self.seq_time(seq, b.degree)

    def remove(self, seq: int, b: _Bin) -> None:
        b.members.remove(seq)
        b.tokens -= self.lengths[seq]
        # Re-summed rather than decremented, so that float drift never accumulates over moves.
        b.work_ms = sum(self.seq_time(s, b.degree) for s in b.members)

    def load_after(self, b: _Bin, out: int | None, into: int | None) -> float:
        """Load of ``b`` after removing ``out`` and adding ``into`` (either may be None)."""
        work = b.work_ms - (self.seq_time(out, b.degree) if out is not None else 0.0)
        work += self.seq_time(into, b.degree) if into is not None else 0.0
        size = len(b.members) - (out is not None) + (into is not None)
        return self._overhead[b.degree] + work if size else 0.0

    def tokens_ok(self, b: _Bin, out: int | None, into: int) -> bool:
        return b.tokens - (self.lengths[out] if out is not None else 0) + self.lengths[into] <= b.capacity

    def groups(self) -> list[tuple[int, list[int]]]:
        """(degree, sorted sequence indices) per group."""
        return [(b.degree, sorted(b.members)) for b in self.bins]

    def place_lpt(self, seqs: list[int], bins: list[_Bin]) -> list[int]:
        """Longest-processing-time-first into ``bins`` (all of one degree) honouring memory;
        returns what did not fit.

        LPT: sequences by decreasing time, each to the least-loaded group that has room (ties:
        the earlier group), Graham's 4/3-approximation of the min-makespan schedule. Groups of
        one degree share o_d, so "least loaded" is "least work": a heap on (work, index).
        """
        if not bins:
            return list(seqs)
        degree = bins[0].degree
        times, lengths = self.table.of(degree), self.lengths
        order = sorted(seqs, key=lambda s: (-times[s], s))
        if all(lengths[a] >= lengths[b] for a, b in zip(order, order[1:])):
            return self._place_lpt_shrinking(order, bins, times)
        heap = [(b.work_ms, j) for j, b in enumerate(bins)]
        heapq.heapify(heap)
        left = []
        for seq in order:
            skipped = []
            size = lengths[seq]
            while heap and bins[heap[0][1]].tokens + size > bins[heap[0][1]].capacity:
                skipped.append(heapq.heappop(heap))
            if heap:
                j = heap[0][1]
                b = bins[j]
                b.members.append(seq)
                b.tokens += size
                b.work_ms += times[seq]
                heapq.heapreplace(heap, (b.work_ms, j))
            else:
                left.append(seq)
            for item in skipped:
                heapq.heappush(heap, item)
        return left

    def _place_lpt_shrinking(self, order: list[int], bins: list[_Bin], times: dict[int, float]) -> list[int]:
        """place_lpt when the sizes never grow along ``order`` (time increases with length, the
        usual case): a group without room for one sequence is parked, keyed by its room, and
        comes back only once a sequence small enough arrives, instead of being popped and
        pushed back for every sequence (which cost 27 M heap operations at 4096 ranks). The
        choice is the same: the least (work, index) group with room."""
        lengths = self.lengths
        heap = [(b.work_ms, j) for j, b in enumerate(bins)]
        heapq.heapify(heap)
        parked: list[tuple[int, int, float]] = []  # (-room, index, work): largest room first
        left = []
        for seq in order:
            size = lengths[seq]
            while parked and -parked[0][0] >= size:
                _, j, work = heapq.heappop(parked)
                heapq.heappush(heap, (work, j))
            while heap and bins[heap[0][1]].tokens + size > bins[heap[0][1]].capacity:
                work, j = heapq.heappop(heap)
                heapq.heappush(parked, (bins[j].tokens - bins[j].capacity, j, work))
            if not heap:
                left.append(seq)
                continue
            j = heap[0][1]
            b = bins[j]
            b.members.append(seq)
            b.tokens += size
            b.work_ms += times[seq]
            heapq.heapreplace(heap, (b.work_ms, j))
        return left

    def place_anywhere(self, seqs: list[int]) -> bool:
        """Put leftovers in any group with room, the one that ends least loaded; False if stuck."""
        for seq in sorted(seqs, key=lambda s: (-self.lengths[s], s)):
            open_bins = [b for b in self.bins if self.fits(seq, b)]
            if not open_bins:
                return False
            self.add(seq, min(open_bins, key=lambda b: self.load_after(b, None, seq)))
        return True

    def improve(self, max_rounds: int = 200) -> None:
        """Local search on the slowest group: the best single move out of it, else the best swap
        with another group, while that strictly lowers max(slowest, partner). At most
        ``max_rounds`` rounds, and at most _ROUND_BUDGET / groups (a work limit, not a clock)."""
        for _ in range(min(max_rounds, max(8, _ROUND_BUDGET // max(1, len(self.bins))))):
            worst = max(self.bins, key=self.load)
            peak = self.load(worst)
            step = self._best_move(worst, peak) or self._best_swap(worst, peak)
            if step is None:
                return
            seq, target, back = step
            self.remove(seq, worst)
            self.add(seq, target)
            if back is not None:
                self.remove(back, target)
                self.add(back, worst)

    def _best_move(self, worst: _Bin, peak: float):
        best, best_value = None, peak * (1 - _TOL)
        # Per degree, the best target is the least-loaded group with room (the load after the
        # move grows with the load before): scan each degree's groups in load order.
        by_degree: dict[int, list[_Bin]] = {}
        for b in sorted(self.bins, key=self.load):
            if b is not worst:
                by_degree.setdefault(b.degree, []).append(b)
        for seq in worst.members:
            after = self.load_after(worst, seq, None)
            for candidates in by_degree.values():
                target = next((b for b in candidates if self.tokens_ok(b, None, seq)), None)
                if target is None:
                    continue
                value = max(after, self.load_after(target, None, seq))
                if value < best_value:
                    best, best_value = (seq, target, None), value
        return best

    def _best_swap(self, worst: _Bin, peak: float):
        best, best_value = None, peak * (1 - _TOL)
        # A useful swap sends one of the worst group's longest sequences away for one of a
        # lightly loaded group's shortest; checking only those keeps a round O(_SWAP_WIDTH³).
        # The loads after the swap are load_after's, inlined (same float operations).
        lengths = self.lengths
        outs = sorted(worst.members, key=lambda s: (-lengths[s], s))[:_SWAP_WIDTH]
        partners = sorted((b for b in self.bins if b is not worst and b.members), key=self.load)[:_SWAP_WIDTH]
        t_worst, o_worst = self.table.of(worst.degree), self._overhead[worst.degree]
        room_worst = worst.capacity - worst.tokens
        for b in partners:
            ins = sorted(b.members, key=lambda s: (lengths[s], s))[:_SWAP_WIDTH]
            t_b, o_b, room_b = self.table.of(b.degree), self._overhead[b.degree], b.capacity - b.tokens
            same = b.degree == worst.degree
            for seq in outs:
                size = lengths[seq]
                for other in ins:
                    delta = size - lengths[other]
                    if delta <= 0 and same:
                        break
                    if delta > room_b or -delta > room_worst:
                        continue
                    after_worst = o_worst + (worst.work_ms - t_worst[seq] + t_worst[other])
                    value = max(after_worst, o_b + (b.work_ms - t_b[other] + t_b[seq]))
                    if value < best_value:
                        best, best_value = (seq, b, other), value
        return best


def lpt_pack(
    counts: dict[int, int],
    by_degree: dict[int, list[int]],
    lengths: dict[int, int],
    cost: CostModel,
    *,
    improve: bool = True,
    table: TimeTable | None = None,
) -> Packing | None:
    """Pack each degree's sequences into its ``counts[d]`` groups (LPT), then leftovers anywhere,
    then (``improve``) local search; None when some sequence fits nowhere."""
    degrees = [d for d in sorted(counts, reverse=True) for _ in range(counts[d])]
    packing = Packing(degrees, lengths, cost, table)
    left = []
    for d in sorted(counts, reverse=True):
        left += packing.place_lpt(by_degree.get(d, []), [b for b in packing.bins if b.degree == d])
    if not packing.place_anywhere(left):
        return None
    if improve:
        packing.improve()
    return packing


def greedy_pack(degrees: list[int], seqs: list[int], lengths: dict[int, int], cost: CostModel) -> Packing | None:
    """All ``seqs`` onto groups of the given degrees: longest first, each to the group that ends
    least loaded (any degree with room), then local search; None if one fits nowhere."""
    packing = Packing(sorted(degrees, reverse=True), lengths, cost)
    if not packing.place_anywhere(seqs):
        return None
    packing.improve()
    return packing


def refine_tiling(packing: Packing, num_ranks: int, max_rounds: int = 4) -> Packing:
    """Hill-climb over tilings next to the packing's: split one group of degree d into two of
    d/2, or merge two of degree d into one of 2d; repack everything greedily; keep the best.

    The MILP pools work per degree, so it can pick counts that pack badly (3 equal sequences
    on 2 groups); trying the neighbouring tilings repairs most such cases.
    """
    cost, lengths = packing.cost, packing.lengths
    seqs = sorted(lengths)
    allowed = set(cost.degrees(num_ranks))
    for _ in range(max_rounds):
        improved = False
        for degrees in _neighbour_tilings([b.degree for b in packing.bins], allowed):
            candidate = greedy_pack(degrees, seqs, lengths, cost)
            if candidate is not None and candidate.makespan_ms() < packing.makespan_ms() * (1 - _TOL):
                packing, improved = candidate, True
        if not improved:
            return packing
    return packing


def _neighbour_tilings(degrees: list[int], allowed: set[int]) -> list[list[int]]:
    counts = {d: degrees.count(d) for d in sorted(set(degrees))}
    result = []
    for d, count in counts.items():
        rest = list(degrees)
        rest.remove(d)
        if d > 1 and d // 2 in allowed and d - d // 2 in allowed:
            result.append(rest + [d // 2, d - d // 2])
        if count >= 2 and 2 * d in allowed:
            rest.remove(d)
            result.append(rest + [2 * d])
    return result


def homogeneous_packing(
    seqs: list[int],
    degree: int,
    num_ranks: int,
    lengths: dict[int, int],
    cost: CostModel,
    *,
    improve: bool = True,
    table: TimeTable | None = None,
) -> Packing | None:
    """All ``seqs`` on num_ranks/degree groups of one degree; None if they do not fit."""
    return lpt_pack({degree: num_ranks // degree}, {degree: seqs}, lengths, cost, improve=improve, table=table)


def place_groups(degrees: list[int]) -> list[tuple[int, ...]]:
    """Rank tuples for groups of these degrees on consecutive ranks from 0, largest first.

    With power-of-two degrees summing to a power of two, decreasing order keeps each start a sum
    of larger powers of two, hence a multiple of the group's own degree: every group is a buddy
    block (parallel.context), and groups of ≤ 8 never straddle an 8-GPU node. Other sizes
    (group_sizes='any') are contiguous blocks, which may straddle a node.
    """
    order = sorted(range(len(degrees)), key=lambda j: -degrees[j])
    ranks: list[tuple[int, ...]] = [()] * len(degrees)
    start = 0
    for j in order:
        ranks[j] = tuple(range(start, start + degrees[j]))
        start += degrees[j]
    return ranks

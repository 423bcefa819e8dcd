"""Combinatorial micro-batch planner: bisection on the makespan over the pooled rank demand,
then a real packing. Deterministic (no clock, no randomness) and O(I·K·D) array work for K
sequences, D degrees and I ≤ 60 bisection steps, plus one LPT packing and a bounded local search.

For a target makespan C each sequence k takes the allowed degree d that spends the least
rank-time d·t(s_k, d) among those whose group can run it alone within C and hold it
(o_d + t(s_k, d) ≤ C, s_k ≤ κ_d); ties go to the smaller degree. With bandwidth non-increasing
in the degree that is the smallest such degree. The sequences of degree d, work W_d = Σ t and
tokens S_d = Σ s, need at least

    n_d(C) = max(⌈W_d / (C − o_d)⌉, ⌈S_d / κ_d⌉, #{t > (C − o_d)/2}, #{s > κ_d/2})

groups (two "big" sequences cannot share a group), so R(C) = Σ_d d·n_d(C) ranks. The
smallest C with R(C) ≤ N (found by bisection between the slice's lower bound and a C that
fits) gives the tiling; the N − R(C) spare ranks become more groups of the degree whose pooled
load o_d + W_d / n_d is highest. The sequences are then packed into real groups (LPT per degree
under memory, leftovers anywhere, local search: planner.packing), and the makespan is the cost
model's. The pooling is a relaxation, so the packed makespan can exceed C; the plan's gap to the
step's lower bound (planner.checks) is what the planner reports.
"""

from __future__ import annotations

import math

import numpy as np

from planner.cost import CostModel
from planner.packing import Packing, TimeTable, lpt_pack

__all__ = ["DemandModel", "moldable_packing"]

# Bisection stops when the bracket is this narrow (relative) or after _MAX_STEPS halvings.
_REL_TOL = 1e-4
_MAX_STEPS = 60
# Targets tried for the real packing: the bisection's C and a few looser ones, whose tilings
# leave more spare ranks (the pooled demand is not exact, so the best target is not always C).
_LOOSER = (1.0, 1.03, 1.1)
# Halvings evaluated per vectorised call (2**_LOOKAHEAD - 1 midpoints), and doublings tried at once.
_LOOKAHEAD = 4
_LOOKAHEAD_MAX_SEQS = 48
_DOUBLINGS = 8


def _bins(total: float, capacity: float) -> int | None:
    """Groups of ``capacity`` that ``total`` needs (0 for nothing; None if it cannot fit: a
    calibrated cost model may price a tiny batch at zero, and 0/0 must not become NaN)."""
    if total <= 0:
        return 0
    if capacity <= 0:
        return None
    return math.ceil(total / capacity * (1 - 1e-12))


def _midpoints(lo: float, hi: float, depth: int, out: list[float]) -> None:
    """Every midpoint a bisection of [lo, hi] can visit in ``depth`` halvings (same floats)."""
    if depth == 0:
        return
    mid = 0.5 * (lo + hi)
    out.append(mid)
    _midpoints(lo, mid, depth - 1, out)
    _midpoints(mid, hi, depth - 1, out)


class DemandModel:
    """Per-sequence times, sizes and degree data of one micro-batch, as arrays."""

    def __init__(self, seqs: list[int], lengths: dict[int, int], num_ranks: int, cost: CostModel):
        self.seqs, self.num_ranks, self.cost = seqs, num_ranks, cost
        self.floor = 1
        """Degrees below this are not offered to any sequence (see moldable_packing)."""
        self.s_K = np.asarray([lengths[i] for i in seqs], dtype=np.float64)
        self.d_D = np.asarray(cost.degrees(num_ranks), dtype=np.int64)
        self.kappa_D = np.asarray([cost.token_capacity(int(d)) for d in self.d_D], dtype=np.float64)
        self.o_D = np.asarray([cost.group_overhead_ms(int(d)) for d in self.d_D])
        self.t_KD = np.stack([cost.seq_times_ms(self.s_K, int(d)) for d in self.d_D], axis=1)
        fits_KD = self.s_K[:, None] <= self.kappa_D[None, :]
        self.alone_KD = np.where(fits_KD, self.o_D[None, :] + self.t_KD, np.inf)
        self.rank_time_KD = self.d_D[None, :] * self.t_KD

    def lower_bound_ms(self) -> float:
        """No packing of this micro-batch beats its slowest sequence alone, nor the average rank load."""
        longest = float(self.alone_KD.min(axis=1).max())
        finite = np.where(np.isfinite(self.alone_KD), self.rank_time_KD, np.inf)
        average = float(self.o_D.min()) + float(finite.min(axis=1).sum()) / self.num_ranks
        return max(longest, average)

    def choose(self, target_ms: float) -> np.ndarray | None:
        """Index into d_D of each sequence's degree at this target; None if one cannot make it."""
        ok_KD = (self.alone_KD <= target_ms) & (self.d_D >= self.floor)[None, :]
        if not ok_KD.any(axis=1).all():
            return None
        return np.argmin(np.where(ok_KD, self.rank_time_KD, np.inf), axis=1)

    def counts(self, target_ms: float) -> dict[int, int] | None:
        """n_d(C) of the module docstring per degree used (None if the target is impossible)."""
        choice_K = self.choose(target_ms)
        if choice_K is None:
            return None
        need_D = self._need(choice_K, target_ms)
        if need_D is None:
            return None
        return {int(self.d_D[j]): int(need_D[j]) for j in np.flatnonzero(need_D)}

    def _need(self, choice_K: np.ndarray, target_ms: float) -> np.ndarray | None:
        """n_d(C) for every degree (0 where unused), per-degree sums by bincount (no Python loop)."""
        num_d = len(self.d_D)
        t_K = self.t_KD[np.arange(len(choice_K)), choice_K]
        room_D = target_ms - self.o_D
        used_D = np.bincount(choice_K, minlength=num_d) > 0
        work_D = np.bincount(choice_K, weights=t_K, minlength=num_d)
        tokens_D = np.bincount(choice_K, weights=self.s_K, minlength=num_d)
        if np.any(used_D & (room_D <= 0) & (work_D > 0)):
            return None
        big_t_D = np.bincount(choice_K, weights=t_K > room_D[choice_K] / 2, minlength=num_d)
        big_s_D = np.bincount(choice_K, weights=self.s_K > self.kappa_D[choice_K] / 2, minlength=num_d)
        with np.errstate(divide="ignore", invalid="ignore"):
            by_time_D = np.where(work_D > 0, np.ceil(work_D / np.where(room_D > 0, room_D, 1.0) * (1 - 1e-12)), 0.0)
        by_tokens_D = np.ceil(tokens_D / self.kappa_D * (1 - 1e-12))
        need_D = np.maximum.reduce([by_time_D, by_tokens_D, big_t_D, big_s_D, np.ones(num_d)])
        return np.where(used_D, need_D, 0).astype(np.int64)

    def ranks(self, target_ms: float) -> float:
        choice_K = self.choose(target_ms)
        need_D = None if choice_K is None else self._need(choice_K, target_ms)
        return math.inf if need_D is None else float(need_D @ self.d_D)

    def ranks_many(self, targets_C: np.ndarray) -> np.ndarray:
        """:meth:`ranks` at every target of ``targets_C`` at once (the same float operations,
        element by element, so the same values): R(C), +inf where a target is impossible."""
        c = np.asarray(targets_C, dtype=np.float64)
        num_d = len(self.d_D)
        ok_KCD = (self.alone_KD[:, None, :] <= c[None, :, None]) & (self.d_D >= self.floor)[None, None, :]
        possible_C = ok_KCD.any(axis=2).all(axis=0)
        choice_KC = np.argmin(np.where(ok_KCD, self.rank_time_KD[:, None, :], np.inf), axis=2)
        mine_KCD = choice_KC[:, :, None] == np.arange(num_d)[None, None, :]
        t_KC = np.take_along_axis(self.t_KD, choice_KC, axis=1)
        room_CD = c[:, None] - self.o_D[None, :]
        # Sums over k in index order, as bincount adds them (adding 0.0 changes nothing).
        used_CD = mine_KCD.any(axis=0)
        work_CD = np.where(mine_KCD, t_KC[:, :, None], 0.0).sum(axis=0)
        tokens_CD = np.where(mine_KCD, self.s_K[:, None, None], 0.0).sum(axis=0)
        big_t_CD = (mine_KCD & (t_KC[:, :, None] > room_CD[None, :, :] / 2)).sum(axis=0)
        big_s_CD = (mine_KCD & (self.s_K[:, None, None] > self.kappa_D[None, None, :] / 2)).sum(axis=0)
        stuck_C = (used_CD & (room_CD <= 0) & (work_CD > 0)).any(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            by_time_CD = np.where(
                work_CD > 0, np.ceil(work_CD / np.where(room_CD > 0, room_CD, 1.0) * (1 - 1e-12)), 0.0
            )
        by_tokens_CD = np.ceil(tokens_CD / self.kappa_D[None, :] * (1 - 1e-12))
        need_CD = np.maximum.reduce([by_time_CD, by_tokens_CD, big_t_CD, big_s_CD, np.ones_like(by_time_CD)])
        need_CD = np.where(used_CD, need_CD, 0).astype(np.int64)
        return np.where(possible_C & ~stuck_C, (need_CD @ self.d_D).astype(np.float64), np.inf)

    def smallest_target(self, upper_ms: float | None = None) -> float | None:
        """The least C (to _REL_TOL) with R(C) ≤ N, or None if none up to ``upper_ms`` fits.

        A bisection, run _LOOKAHEAD halvings at a time: the midpoints those halvings can visit
        are computed as the bisection would and evaluated in one vectorised call, then the
        bisection walks them, so the result is that of the plain bisection."""
        if len(self.s_K) > _LOOKAHEAD_MAX_SEQS:
            return self._smallest_target_scalar(upper_ms)
        n = self.num_ranks
        lo = self.lower_bound_ms()
        hi = lo if upper_ms is None else max(upper_ms, lo)
        if upper_ms is None:
            doublings = [hi]
            for _ in range(_MAX_STEPS - 1):
                doublings.append(doublings[-1] * 2)
            fits = np.flatnonzero(self.ranks_many(np.asarray(doublings[:_DOUBLINGS])) <= n)
            if len(fits):
                hi = doublings[int(fits[0])]
            else:
                for hi in doublings[_DOUBLINGS:]:
                    if self.ranks(hi) <= n:
                        break
        ends = self.ranks_many(np.asarray([hi, lo]))
        if ends[0] > n:
            return None
        if ends[1] <= n:
            return lo
        steps = 0
        while steps < _MAX_STEPS:
            mids: list[float] = []
            _midpoints(lo, hi, _LOOKAHEAD, mids)
            fits_at = dict(zip(mids, (self.ranks_many(np.asarray(mids)) <= n).tolist()))
            for _ in range(_LOOKAHEAD):
                if steps >= _MAX_STEPS or hi - lo <= _REL_TOL * hi:
                    return hi
                steps += 1
                mid = 0.5 * (lo + hi)
                if fits_at[mid]:
                    hi = mid
                else:
                    lo = mid
        return hi

    def _smallest_target_scalar(self, upper_ms: float | None) -> float | None:
        """The same bisection one target at a time (large micro-batches: K x 15 x D
        temporaries would cost more than the calls they save)."""
        lo = self.lower_bound_ms()
        hi = lo if upper_ms is None else max(upper_ms, lo)
        if upper_ms is None:
            for _ in range(_MAX_STEPS):
                if self.ranks(hi) <= self.num_ranks:
                    break
                hi *= 2
        if self.ranks(hi) > self.num_ranks:
            return None
        if self.ranks(lo) <= self.num_ranks:
            return lo
        for _ in range(_MAX_STEPS):
            if hi - lo <= _REL_TOL * hi:
                break
            mid = 0.5 * (lo + hi)
            if self.ranks(mid) <= self.num_ranks:
                hi = mid
            else:
                lo = mid
        return hi

    def assignment(self, target_ms: float) -> dict[int, list[int]]:
        """Sequence indices per degree at this target."""
        choice_K = self.choose(target_ms)
        by_degree: dict[int, list[int]] = {}
        for k, j in enumerate(choice_K):
            by_degree.setdefault(int(self.d_D[j]), []).append(self.seqs[k])
        return by_degree

    def spread_spare(self, counts: dict[int, int], target_ms: float) -> dict[int, int]:
        """Give the N − R spare ranks to the degrees with the highest pooled load, one group at a time."""
        counts = dict(counts)
        choice_K = self.choose(target_ms)
        work = {int(self.d_D[j]): float(self.t_KD[choice_K == j, j].sum()) for j in np.unique(choice_K)}
        overhead = {int(d): float(o) for d, o in zip(self.d_D, self.o_D)}
        spare = self.num_ranks - sum(d * n for d, n in counts.items())
        while spare > 0:
            usable = [d for d in counts if d <= spare]
            if not usable:
                # Spare ranks below every used degree: empty groups the local search may fill.
                d = max(int(x) for x in self.d_D if x <= spare)
                counts[d] = counts.get(d, 0) + 1
                spare -= d
                continue
            d = max(usable, key=lambda d: (overhead[d] + work.get(d, 0.0) / counts[d], -d))
            counts[d] += 1
            spare -= d
        return counts


def moldable_packing(
    seqs: list[int],
    lengths: dict[int, int],
    num_ranks: int,
    cost: CostModel,
    *,
    improve_rounds: int = 200,
    table: TimeTable | None = None,
) -> Packing | None:
    """The best real packing over the module's targets and degree floors; None if the pooled
    demand never fits.

    Floors: every degree (1), and only degrees that hold the slice's longest sequence. The
    second keeps short sequences in the large groups' spare time instead of on groups of their
    own, which the pooled demand cannot see (it ignores how a large group's time fragments).
    """
    model = DemandModel(seqs, lengths, num_ranks, cost)
    best: Packing | None = None
    tried: set[tuple] = set()
    for floor in sorted({1, cost.min_degree(int(model.s_K.max()), num_ranks)}):
        model.floor = floor
        best = _best_over_targets(model, lengths, cost, table, best, tried)
    # Only the best LPT packing gets the local search: it rarely changes the ranking and costs
    # more than everything else.
    if best is not None:
        best.improve(max_rounds=improve_rounds)
    return best


def _best_over_targets(model: DemandModel, lengths, cost, table, best: Packing | None, tried: set) -> Packing | None:
    """LPT packings at the least feasible target and the looser ones; the best of them and ``best``."""
    num_ranks = model.num_ranks
    target = model.smallest_target()
    if target is None:
        return best
    for factor in _LOOSER:
        counts = model.counts(target * factor)
        if counts is None or sum(d * n for d, n in counts.items()) > num_ranks:
            continue
        counts = model.spread_spare(counts, target * factor)
        by_degree = model.assignment(target * factor)
        key = (tuple(sorted(counts.items())), tuple((d, tuple(v)) for d, v in sorted(by_degree.items())))
        if key in tried:
            continue
        tried.add(key)
        packing = lpt_pack(counts, by_degree, lengths, cost, improve=False, table=table)
        if packing is not None and (best is None or packing.makespan_ms() < best.makespan_ms()):
            best = packing
    return best

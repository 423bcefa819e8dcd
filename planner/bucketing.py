"""Length bucketing and micro-batch cuts: the two 1-D partitions of the planner.

Both work on lengths sorted ascending (ties by index, so results are deterministic). The
bucketing is an exact DP vectorised over one layer with numpy (O(Q·m²) for m distinct values;
the planner buckets only small micro-batches for its MILP). The micro-batch cut is a bisection
with binary searches on prefix sums, O(M·log K·log Σs), so it scales to any batch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bucket_error", "cut_microbatches", "optimal_buckets", "sorted_order"]


def sorted_order(lengths: list[int]) -> list[int]:
    """Indices of ``lengths`` sorted by (length, index)."""
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def optimal_buckets(lengths: list[int], num_buckets: int) -> list[tuple[int, list[int]]]:
    """Split the sequences into at most ``num_buckets`` groups of consecutive lengths, each
    represented by its maximum, minimising the padding error Σ_k (max(bucket(k)) − s_k).

    DP over the m distinct values u_0 < … < u_{m−1} (count c_j, prefix counts C, prefix sums S):
    a bucket holding values i … j−1 costs u_{j−1}·(C_j − C_i) − (S_j − S_i), and

        E_q(j) = min_{i < j} E_{q−1}(i) + cost(i, j),   answer E_Q(m).

    Sorting a bucket's sequences by length never hurts (the cost is Monge), so consecutive
    buckets are optimal. Returns ``(representative, indices)`` pairs, ascending, indices sorted
    by (length, index).
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets: got {num_buckets}; must be >= 1")
    order = sorted_order(lengths)
    if not order:
        return []
    values, counts = np.unique(np.asarray([lengths[i] for i in order], dtype=np.int64), return_counts=True)
    cuts = _bucket_cuts(values.astype(np.float64), counts.astype(np.float64), num_buckets)
    buckets, start = [], 0
    prefix = np.concatenate([[0], np.cumsum(counts)])
    for hi in cuts[1:]:
        end = int(prefix[hi])
        buckets.append((int(values[hi - 1]), order[start:end]))
        start = end
    return buckets


def _bucket_cuts(values: np.ndarray, counts: np.ndarray, num_buckets: int) -> list[int]:
    """Boundaries 0 = b_0 < … < b_Q = m over the distinct values of an optimal bucketing."""
    m = len(values)
    q_max = min(num_buckets, m)
    if q_max == m:
        return list(range(m + 1))
    count_prefix = np.concatenate([[0.0], np.cumsum(counts)])
    sum_prefix = np.concatenate([[0.0], np.cumsum(values * counts)])
    # cost[i, j] for a bucket of values i .. j-1 (j > i); +inf elsewhere.
    j_idx = np.arange(m + 1)
    top = np.concatenate([[0.0], values])[None, :]
    cost = top * (count_prefix[None, :] - count_prefix[:, None]) - (sum_prefix[None, :] - sum_prefix[:, None])
    cost[j_idx[:, None] >= j_idx[None, :]] = np.inf
    error = np.full(m + 1, np.inf)
    error[0] = 0.0
    parents = []
    for _ in range(q_max):
        total = error[:, None] + cost
        parent = np.argmin(total, axis=0)
        error = total[parent, j_idx]
        parents.append(parent)
    cuts = [m]
    for parent in reversed(parents):
        cuts.append(int(parent[cuts[-1]]))
    return cuts[::-1]


def bucket_error(lengths: list[int], buckets: list[tuple[int, list[int]]]) -> int:
    """Σ (representative − s) over all sequences: the tokens the bucketing adds."""
    return sum(rep - lengths[i] for rep, indices in buckets for i in indices)


def cut_microbatches(sorted_lengths: list[int], num_microbatches: int) -> list[tuple[int, int]]:
    """Cut a list into ``num_microbatches`` non-empty consecutive slices ``(start, stop)`` whose
    largest slice sum B* is the least possible, as evenly as that allows. O(M·log K·log Σs).

    B*: bisection over integers for the least B that a greedy cover (each slice as long as fits
    in B, found by binary search on the prefix sums P) does in at most M slices; splitting a
    slice never raises the maximum, so at most M slices means exactly M are possible.
    Evenness: each cut j in turn takes the position nearest the even split of what is left,
    P_prev + (P_K − P_prev)/(M − j + 1), among the positions that keep the slice ≤ B* and leave
    a suffix that M − j slices of ≤ B* can still cover (the greedy cover from the right says
    where that is). Every choice stays feasible, so the cut always exists.
    """
    k = len(sorted_lengths)
    m = num_microbatches
    if not 1 <= m <= k:
        raise ValueError(f"num_microbatches: got {m}; must be in [1, {k}] for {k} sequences")
    prefix = np.concatenate([[0], np.cumsum(np.asarray(sorted_lengths, dtype=np.int64))])
    best = _least_bottleneck(prefix, m)
    # starts[t]: the leftmost start from which t slices of <= best cover the rest (greedy from the right).
    starts = [k]
    for _ in range(m):
        starts.append(int(np.searchsorted(prefix, prefix[starts[-1]] - best, side="left")))
    cuts = [0]
    for j in range(1, m):
        prev = cuts[-1]
        lo = max(prev + 1, starts[m - j])
        hi = min(int(np.searchsorted(prefix, prefix[prev] + best, side="right")) - 1, k - (m - j))
        ideal = prefix[prev] + (prefix[k] - prefix[prev]) / (m - j + 1)
        at = int(np.searchsorted(prefix, ideal, side="left"))
        # The nearer of the two positions around the ideal (the earlier on a tie), clamped.
        options = [p for p in (at - 1, at) if lo <= p <= hi] or [lo if ideal < prefix[lo] else hi]
        cuts.append(min(options, key=lambda p: (abs(prefix[p] - ideal), p)))
    cuts.append(k)
    return list(zip(cuts[:-1], cuts[1:]))


def _least_bottleneck(prefix: np.ndarray, m: int) -> int:
    """The least B such that the items (prefix sums ``prefix``) split into <= m runs of sum <= B."""
    items = np.diff(prefix)
    lo, hi = int(max(items.max(), -(-int(prefix[-1]) // m))), int(prefix[-1])
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy_runs(prefix, mid, m) <= m:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _greedy_runs(prefix: np.ndarray, bound: int, limit: int) -> int:
    """Runs of sum <= bound a left-to-right greedy cover needs (stops counting past ``limit``)."""
    at, runs, end = 0, 0, len(prefix) - 1
    while at < end and runs <= limit:
        at = int(np.searchsorted(prefix, prefix[at] + bound, side="right")) - 1
        runs += 1
    return runs

"""Length bucketing and micro-batch cuts: the two exact 1-D dynamic programs of the planner.

Both work on lengths sorted ascending (ties by index, so results are deterministic) and are
vectorised over one DP layer with numpy: O(Q·m²) array work for m distinct values, which is a
few milliseconds for a 512-sequence batch.
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
    """Cut a list into ``num_microbatches`` non-empty consecutive slices ``(start, stop)`` that
    minimise the largest slice sum; among those, minimise Σ (slice sum)² (the most even cut).

    Both objectives are exact DPs over prefix sums P: with F_m(j) the best value for the
    first j items in m slices,
        min-max:   F_m(j) = min_{i<j} max(F_{m−1}(i), P_j − P_i)
        balance:   G_m(j) = min_{i<j, P_j − P_i ≤ B*} G_{m−1}(i) + (P_j − P_i)²
    where B* = F_M(K).
    """
    k = len(sorted_lengths)
    if not 1 <= num_microbatches <= k:
        raise ValueError(f"num_microbatches: got {num_microbatches}; must be in [1, {k}] for {k} sequences")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(sorted_lengths, dtype=np.float64))])
    span = prefix[None, :] - prefix[:, None]
    invalid = np.arange(k + 1)[:, None] >= np.arange(k + 1)[None, :]
    span = np.where(invalid, np.inf, span)
    best_max = _layered_dp(span, num_microbatches, np.maximum)[0]
    # Tolerance: float sums of ints are exact here (< 2**53), the epsilon only guards the comparison.
    squares = np.where(span <= best_max + 1e-6, span * span, np.inf)
    _, parents = _layered_dp(squares, num_microbatches, np.add)
    cuts = [k]
    for parent in reversed(parents):
        cuts.append(int(parent[cuts[-1]]))
    cuts = cuts[::-1]
    return list(zip(cuts[:-1], cuts[1:]))


def _layered_dp(cost: np.ndarray, layers: int, combine) -> tuple[float, list[np.ndarray]]:
    """F_m(j) = min_i combine(F_{m−1}(i), cost[i, j]) for m = 1 … layers; returns F_layers(end), parents."""
    n = cost.shape[0]
    value = np.full(n, np.inf)
    value[0] = 0.0
    parents = []
    for _ in range(layers):
        total = combine(value[:, None], cost)
        parent = np.argmin(total, axis=0)
        value = total[parent, np.arange(n)]
        parents.append(parent)
    return float(value[-1]), parents

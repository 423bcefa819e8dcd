"""planner.bucketing: both dynamic programs equal exhaustive search on small inputs."""

from __future__ import annotations

import itertools
import random

import pytest

from planner.bucketing import bucket_error, cut_microbatches, optimal_buckets


def brute_force_bucket_error(lengths: list[int], num_buckets: int) -> int:
    """Least Σ(max − s) over every way to cut the sorted lengths into <= num_buckets runs.

    Runs of the sorted list are enough: FlexSP's DP and ours assume it, and the test of
    arbitrary partitions below checks that assumption on small inputs.
    """
    values = sorted(lengths)
    best = None
    for k in range(1, min(num_buckets, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), k - 1):
            bounds = (0, *cuts, len(values))
            error = sum(max(values[a:b]) * (b - a) - sum(values[a:b]) for a, b in zip(bounds, bounds[1:]))
            best = error if best is None else min(best, error)
    return best


def any_partition_error(lengths: list[int], num_buckets: int) -> int:
    """Least error over all assignments of sequences to buckets (not only sorted runs)."""
    best = None
    for labels in itertools.product(range(num_buckets), repeat=len(lengths)):
        error = 0
        for b in set(labels):
            members = [s for s, label in zip(lengths, labels) if label == b]
            error += max(members) * len(members) - sum(members)
        best = error if best is None else min(best, error)
    return best


CASES = [[random.Random(seed).randint(1, 60) for _ in range(random.Random(seed).randint(1, 9))] for seed in range(40)]


@pytest.mark.parametrize("lengths", CASES)
@pytest.mark.parametrize("num_buckets", [1, 2, 3, 5])
def test_optimal_buckets_equal_brute_force(lengths, num_buckets):
    buckets = optimal_buckets(lengths, num_buckets)
    assert len(buckets) <= num_buckets
    indices = sorted(i for _, members in buckets for i in members)
    assert indices == list(range(len(lengths)))
    for rep, members in buckets:
        assert rep == max(lengths[i] for i in members)
    assert bucket_error(lengths, buckets) == brute_force_bucket_error(lengths, num_buckets)


@pytest.mark.parametrize("lengths", CASES[:12])
def test_sorted_runs_are_optimal_among_all_partitions(lengths):
    small = lengths[:6]
    assert brute_force_bucket_error(small, 3) == any_partition_error(small, 3)


def test_buckets_are_ascending_and_deterministic():
    lengths = [5, 3, 5, 9, 1, 3, 9, 9]
    buckets = optimal_buckets(lengths, 2)
    assert buckets == optimal_buckets(list(lengths), 2)
    assert [rep for rep, _ in buckets] == sorted(rep for rep, _ in buckets)
    # Ties are ordered by index, so equal lengths keep their input order.
    assert [i for _, members in buckets for i in members] == [4, 1, 5, 0, 2, 3, 6, 7]
    # Fewer distinct lengths than buckets: one exact bucket per length.
    assert [rep for rep, _ in optimal_buckets(lengths, 10)] == [1, 3, 5, 9]


def test_large_input_is_fast_and_exact_on_a_known_case():
    lengths = [10] * 100 + [1000] * 3 + [11] * 50
    buckets = optimal_buckets(lengths, 2)
    assert [rep for rep, _ in buckets] == [11, 1000] and bucket_error(lengths, buckets) == 100


def brute_force_cut(lengths: list[int], num_microbatches: int) -> tuple[int, int]:
    """(least max slice sum, least Σ slice² among those) over all cuts into non-empty runs."""
    best = None
    for cuts in itertools.combinations(range(1, len(lengths)), num_microbatches - 1):
        bounds = (0, *cuts, len(lengths))
        sums = [sum(lengths[a:b]) for a, b in zip(bounds, bounds[1:])]
        key = (max(sums), sum(x * x for x in sums))
        best = key if best is None else min(best, key)
    return best


@pytest.mark.parametrize("lengths", CASES)
def test_cut_microbatches_equal_brute_force(lengths):
    ordered = sorted(lengths)
    for m in range(1, len(ordered) + 1):
        slices = cut_microbatches(ordered, m)
        assert len(slices) == m and slices[0][0] == 0 and slices[-1][1] == len(ordered)
        assert all(lo < hi for lo, hi in slices) and all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        sums = [sum(ordered[lo:hi]) for lo, hi in slices]
        assert (max(sums), sum(x * x for x in sums)) == brute_force_cut(ordered, m)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_buckets"):
        optimal_buckets([1, 2], 0)
    with pytest.raises(ValueError, match=r"num_microbatches: got 3; must be in \[1, 2\]"):
        cut_microbatches([1, 2], 3)
    assert optimal_buckets([], 4) == []


def test_cut_of_a_large_batch_is_the_least_bottleneck():
    # 200,000 sequences: the cut's largest slice is the least any M-way cut can have, checked by
    # a plain greedy cover (B* fits in M runs, B* - 1 does not). No (K+1)² arrays are built.
    rng = random.Random(3)
    lengths = sorted(rng.randint(1, 50_000) for _ in range(200_000))

    def runs(bound):
        count, total = 1, 0
        for s in lengths:
            if total + s > bound:
                count, total = count + 1, 0
            total += s
        return count

    for m in (2, 7, 64):
        slices = cut_microbatches(lengths, m)
        sums = [sum(lengths[lo:hi]) for lo, hi in slices]
        assert len(slices) == m and slices[-1][1] == len(lengths)
        assert runs(max(sums)) <= m < runs(max(sums) - 1)

"""planner.baselines: static SP respects its degree and memory, batch-adaptive is the best degree."""

from __future__ import annotations

import math
import random

import pytest

from planner.baselines import batch_adaptive, best_fit_decreasing, smallest_static_degree, static_sp
from planner.cost import CostModel


@pytest.fixture
def cost() -> CostModel:
    # 1024 tokens per rank, cheap communication inside 4 ranks, a cliff at 8.
    return CostModel(
        quad_ms=1e-4,
        lin_ms=0.1,
        beta_ms=30.0,
        act_mb_per_token=1.0,
        memory_budget_gb=1.0,
        comm_bytes_per_token=2**20,
        bandwidth_gbps={2: 50.0, 4: 40.0, 8: 4.0},
    )


def batch(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [min(7000, int(math.exp(rng.gauss(5.5, 1.2)))) + 1 for _ in range(n)]


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_static_degree_memory_and_fewest_microbatches(cost, degree):
    lengths = batch(0)
    lengths = [min(s, cost.token_capacity(degree)) for s in lengths]
    plan = static_sp(lengths, num_ranks=8, sp_degree=degree, cost=cost)
    plan.validate(lengths, cost)
    assert plan.solver == "static"
    assert {g.degree for mb in plan.microbatches for g in mb.groups} == {degree}
    assert all(len(mb.groups) == 8 // degree for mb in plan.microbatches)
    # As few micro-batches as best-fit decreasing needs, and never fewer than tokens allow.
    bins = best_fit_decreasing(lengths, list(range(len(lengths))), cost.token_capacity(degree))
    assert len(plan.microbatches) == math.ceil(len(bins) / (8 // degree))
    assert len(plan.microbatches) >= math.ceil(sum(lengths) / (8 // degree * cost.token_capacity(degree)))
    for mb in plan.microbatches:
        times = [cost.group_time_ms([lengths[i] for i in g.seq_indices], degree) for g in mb.groups]
        assert max(times) / 1e3 == pytest.approx(mb.predicted_time_s)
    assert plan.predicted_time_s == pytest.approx(sum(mb.predicted_time_s for mb in plan.microbatches))


def test_best_fit_decreasing_respects_capacity():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    bins = best_fit_decreasing(lengths, list(range(8)), 8)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # Σ = 26 > 3 bins of 8


def test_batch_adaptive_is_the_best_degree(cost):
    for seed in range(3):
        lengths = batch(seed)
        best = batch_adaptive(lengths, num_ranks=8, cost=cost)
        best.validate(lengths, cost)
        assert best.solver == "batch_adaptive"
        lowest = smallest_static_degree(lengths, num_ranks=8, cost=cost)
        times = [
            static_sp(lengths, num_ranks=8, sp_degree=d, cost=cost).predicted_time_s
            for d in (1, 2, 4, 8)
            if d >= lowest
        ]
        assert best.predicted_time_s == pytest.approx(min(times))
        assert len({g.degree for mb in best.microbatches for g in mb.groups}) == 1


def test_smallest_static_degree(cost):
    assert smallest_static_degree([100, 1024], num_ranks=8, cost=cost) == 1
    assert smallest_static_degree([100, 1025], num_ranks=8, cost=cost) == 2
    assert smallest_static_degree([5000], num_ranks=8, cost=cost) == 8
    with pytest.raises(ValueError, match=r"lengths\[0\] = 9000 tokens exceeds .*8192 tokens"):
        smallest_static_degree([9000], num_ranks=8, cost=cost)


def test_static_degree_errors(cost):
    with pytest.raises(ValueError, match=r"sp_degree=2 is too small: lengths\[1\] = 3000 tokens exceeds the 2048"):
        static_sp([10, 3000], num_ranks=8, sp_degree=2, cost=cost)
    with pytest.raises(ValueError, match="power of two"):
        static_sp([10], num_ranks=8, sp_degree=3, cost=cost)
    with pytest.raises(ValueError, match="<= num_ranks=8"):
        static_sp([10], num_ranks=8, sp_degree=16, cost=cost)
    with pytest.raises(ValueError, match="power-of-two number of ranks"):
        static_sp([10], num_ranks=12, sp_degree=4, cost=cost)
    capped = CostModel.preset("flexsp-gpt7b-a100", world_size=128)
    with pytest.raises(ValueError, match="allows at most 64"):
        static_sp([10], num_ranks=128, sp_degree=128, cost=capped)

"""planner.async_plan: background plans equal synchronous ones; errors carry the step number."""

from __future__ import annotations

import math
import random

import pytest

from planner import CostModel, plan_step
from planner.async_plan import AsyncPlanner, PlanningError


def batch(seed: int, n: int = 128) -> list[int]:
    rng = random.Random(seed)
    return [min(150_000, int(math.exp(rng.gauss(6.5, 1.5)))) + 1 for _ in range(n)]


def same_plan(a, b) -> bool:
    keys = ("microbatches", "num_ranks", "predicted_time_s", "solver", "lower_bound_s", "dropped")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_async_equals_sync(executor):
    cost = CostModel.preset("flexsp-gpt7b-a100", world_size=32)
    kwargs = {"time_limit_s": 5.0}
    with AsyncPlanner(num_ranks=32, cost=cost, executor=executor, **kwargs) as planner:
        planner.submit(0, batch(0))
        planner.submit(1, batch(1))
        assert planner.pending() == [0, 1]
        plans = [planner.result(0), planner.result(1, timeout=60)]
        assert planner.pending() == []
    for step, plan in enumerate(plans):
        assert same_plan(plan, plan_step(batch(step), num_ranks=32, cost=cost, **kwargs))


def test_errors_name_the_step():
    cost = CostModel.preset("tiny-cpu")
    with AsyncPlanner(num_ranks=4, cost=cost, executor="thread") as planner:
        planner.submit(7, [100, 10**9])
        with pytest.raises(PlanningError, match=r"planning step 7 failed: ValueError: lengths\[1\]") as info:
            planner.result(7)
        assert info.value.step == 7 and isinstance(info.value.__cause__, ValueError)
        planner.submit(8, [100, 200])
        with pytest.raises(ValueError, match="already submitted"):
            planner.submit(8, [1])
        with pytest.raises(ValueError, match="never submitted"):
            planner.result(9)
        planner.result(8).validate([100, 200], cost)


def test_bad_arguments():
    cost = CostModel.preset("tiny-cpu")
    with pytest.raises(ValueError, match="unknown plan_step argument"):
        AsyncPlanner(num_ranks=4, cost=cost, time_limit=1.0)
    with pytest.raises(ValueError, match="executor"):
        AsyncPlanner(num_ranks=4, cost=cost, executor="fork")

"""group_sizes='any': SP groups of any size in the runtime (ParallelContext.ensure_groups) and
plan invariance of the loss and every gradient on 3 ranks, where groups of 3 and the
non-buddy pair (1, 2) run next to one-rank groups."""

from __future__ import annotations

import dataclasses

import pytest

from planner import CostModel, plan_step
from planner.plan import Group, MicroBatch, StepPlan
from tests.distributed import run_on_ranks
from tests.test_train import FP32_TOL, LENGTHS, _loss_and_grads

W = 3


def _hand(groups_per_mb: list[list[tuple[tuple[int, ...], list[int]]]]) -> StepPlan:
    microbatches = [MicroBatch([Group(r, s) for r, s in mb]) for mb in groups_per_mb]
    return StepPlan(microbatches, num_ranks=W, predicted_time_s=0.0, solver="hand", solve_time_s=0.0, group_sizes="any")


def _plans() -> dict[str, StepPlan]:
    return {
        "solo": _hand([[((0,), [0, 1]), ((1,), [2, 3]), ((2,), [4, 5])]]),
        "three": _hand([[((0, 1, 2), [5, 0, 3, 1, 2, 4])]]),
        "pair_12": _hand([[((0,), [2, 4, 1]), ((1, 2), [0, 3, 5])]]),
        "mixed_2mb": _hand([[((0, 1, 2), [5, 2])], [((0,), [0]), ((1, 2), [4, 3, 1])]]),
    }


def _planned(world: int) -> StepPlan:
    base = CostModel.preset("tiny-cpu", world_size=world)
    # ~150 tokens per rank: the 200-token sequence needs a group of at least 2 ranks
    budget = base.model_state_gb + 150 * base.act_mb_per_token / 1024 * 1.02
    cost = dataclasses.replace(base, memory_budget_gb=budget, kv_gather_mb_per_token=0.0, group_sizes="any")
    return plan_step(LENGTHS, num_ranks=world, cost=cost)


def test_the_planner_plans_three_ranks_with_any_group_size():
    plan = _planned(W)
    assert plan.group_sizes == "any" and plan.num_ranks == W
    assert max(g.degree for mb in plan.microbatches for g in mb.groups) >= 2


def _drop_extra_groups(ctx) -> int:
    """Evict every non-buddy group (the rank pool's contexts outlive a test): keep none, ask for none."""
    ctx.max_extra_groups = 0
    ctx.ensure_groups([])
    ctx.max_extra_groups = None
    return ctx.num_cached_groups


def _cache_counts(ctx) -> tuple[int, int]:
    plan = _hand([[((0,), []), ((1, 2), [])]])
    ctx.ensure_groups(g.ranks for mb in plan.microbatches for g in mb.groups)
    ctx.ensure_groups([(1, 2)])  # cached: created once
    first = ctx.num_cached_groups
    # a bound of one non-buddy group: (0, 2) evicts (1, 2), on every rank alike, and back
    ctx.max_extra_groups = 1
    ctx.ensure_groups([(0, 2)])
    evicted = list(ctx._extra)
    ctx.ensure_groups([(1, 2)])
    group = ctx.group((1, 2)) if ctx.rank in (1, 2) else None
    if group is not None:
        import torch
        import torch.distributed as dist

        x = torch.ones(1)
        dist.all_reduce(x, group=group)  # the re-created group works
        assert x.item() == 2
    history = evicted + list(ctx._extra)
    _drop_extra_groups(ctx)
    return first, history, group is not None


def test_ensure_groups_creates_non_buddy_groups_once_and_bounds_the_cache():
    results = run_on_ranks(W, _cache_counts)
    for rank, (first, history, has_pair) in enumerate(results):
        # buddy groups of a 3-rank world: (0, 1) and the world; (1, 2) is extra
        assert history == [(0, 2), (1, 2)]
        assert has_pair == (rank in (1, 2))
        assert first == {0: 2, 1: 3, 2: 2}[rank]


@pytest.mark.slow
def test_plan_invariance_with_groups_of_any_size():
    plans = {**_plans(), "planner": _planned(W)}
    # the first call starts 3 ranks that import torch and DeepSpeed: minutes on a loaded 2-core machine
    runs = {
        name: run_on_ranks(W, _loss_and_grads, plan.to_json(), "sequence", 1, timeout_s=900)
        for name, plan in plans.items()
    }
    # leave the shared rank pool's group caches as they were (buddy groups only)
    assert run_on_ranks(W, _drop_extra_groups) == [2, 2, 1]
    ref_name = next(iter(runs))
    ref_loss = sum(r[0] for r in runs[ref_name])
    ref_aux = sum(r[1] for r in runs[ref_name])
    for name, results in runs.items():
        assert abs(sum(r[0] for r in results) - ref_loss) <= FP32_TOL * ref_loss, name
        assert abs(sum(r[1] for r in results) - ref_aux) <= FP32_TOL * ref_aux, name
        for rank_result, ref_result in zip(results, runs[ref_name], strict=True):
            for pname, g in ref_result[2].items():
                err = ((rank_result[2][pname] - g).norm() / g.norm().clamp_min(1e-30)).item()
                assert err <= FP32_TOL, (name, pname, err)

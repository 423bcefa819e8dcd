"""planner.plan: StepPlan JSON round trips, validation messages and summaries."""

from __future__ import annotations

import json

import pytest

from planner.cost import CostModel
from planner.plan import Group, MicroBatch, StepPlan


def make_plan() -> StepPlan:
    return StepPlan(
        microbatches=[
            MicroBatch([Group((0, 1, 2, 3), [2]), Group((4, 5), [0, 3]), Group((6,), []), Group((7,), [1])], 0.5),
            MicroBatch([Group(tuple(range(8)), [4])], 0.25),
        ],
        num_ranks=8,
        predicted_time_s=0.75,
        solver="highs",
        solve_time_s=0.01,
        lower_bound_s=0.5,
        dropped=[5],
    )


LENGTHS = [100, 200, 900, 50, 3000, 10**9]


@pytest.fixture
def cost() -> CostModel:
    return CostModel(quad_ms=0.0, lin_ms=1.0, beta_ms=1.0, act_mb_per_token=1.0, memory_budget_gb=1.0)


def test_json_round_trip():
    plan = make_plan()
    text = plan.to_json()
    back = StepPlan.from_json(text)
    assert back == plan
    data = json.loads(text)
    group = data["microbatches"][0]["groups"][1]
    assert group == {"ranks": [4, 5], "seq_indices": [0, 3]}
    assert back.microbatches[0].groups[1].ranks == (4, 5)
    assert back.microbatches[0].groups[1].seq_indices == [0, 3]


def test_valid_plan_passes(cost):
    make_plan().validate(LENGTHS, cost)
    make_plan().validate(LENGTHS)


def test_group_helpers():
    mb = make_plan().microbatches[0]
    assert mb.group_of(5).ranks == (4, 5) and mb.groups[0].degree == 4
    with pytest.raises(ValueError, match="rank 9"):
        mb.group_of(9)
    assert len({Group((0,), [1]), Group((0,), [1])}) == 1


def test_summary_and_shapes():
    summary = make_plan().summary()
    assert summary["microbatches"] == 2 and summary["shape"] == ["4,2,1x2", "8"]
    assert summary["gap"] == pytest.approx(0.5) and summary["dropped"] == 1 and summary["solver"] == "highs"
    json.dumps(summary)


def mutate(edit) -> StepPlan:
    plan = make_plan()
    edit(plan)
    return plan


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda p: setattr(p, "num_ranks", 6), "power-of-two number of ranks"),
        (lambda p: p.microbatches[0].groups.pop(), "do not tile ranks 0..7"),
        (lambda p: p.microbatches[0].groups.__setitem__(1, Group((5, 6), [0, 3])), "not a buddy block"),
        (lambda p: p.microbatches[0].groups.__setitem__(0, Group((0, 1, 2), [2])), "has 3 ranks"),
        (lambda p: p.microbatches[1].groups[0].seq_indices.append(2), "sequence 2 appears 2 times"),
        (lambda p: p.microbatches[1].groups[0].seq_indices.clear(), "sequence 4 appears 0 times"),
        (lambda p: p.microbatches[1].groups[0].seq_indices.append(5), "sequence 5 is dropped and also planned"),
        (lambda p: p.microbatches[1].groups[0].seq_indices.append(9), "names sequence 9, not in the batch of 6"),
        (lambda p: setattr(p, "dropped", [5, 7]), "dropped sequence index 7"),
        (lambda p: setattr(p, "microbatches", []), "no micro-batches"),
    ],
)
def test_invalid_plans_are_named(edit, message, cost):
    with pytest.raises(ValueError, match=message):
        mutate(edit).validate(LENGTHS, cost)


def test_memory_is_checked_under_a_cost_model(cost):
    # 1024 tokens per rank: the 3000-token sequence fits on 8 ranks, not on 2.
    plan = make_plan()
    plan.microbatches[0].groups[1] = Group((4, 5), [0, 3, 4])
    plan.microbatches[1].groups[0] = Group(tuple(range(8)), [])
    plan.validate(LENGTHS)
    with pytest.raises(ValueError, match=r"micro-batch 0 group 1 \(2 ranks\) runs 3150 tokens but holds at most 2048"):
        plan.validate(LENGTHS, cost)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("num_ranks"), "missing field 'num_ranks'"),
        (lambda d: d.update(num_ranks="8"), "plan.num_ranks"),
        (lambda d: d["microbatches"][0]["groups"][0].update(ranks=[0, 1.5]), r"groups\[0\].ranks: expected a list"),
        (lambda d: d["microbatches"][1].pop("groups"), r"microbatches\[1\]: missing field 'groups'"),
        (lambda d: d["microbatches"].append(3), r"microbatches\[2\]: expected an object"),
        (lambda d: d.update(lower_bound_s="x"), "lower_bound_s"),
        (lambda d: d.update(dropped=[True]), "dropped"),
    ],
)
def test_bad_plan_json_is_named(edit, message):
    data = json.loads(make_plan().to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        StepPlan.from_json(json.dumps(data))


def test_not_json():
    with pytest.raises(ValueError, match="invalid JSON"):
        StepPlan.from_json("{")
    with pytest.raises(ValueError, match="expected an object"):
        StepPlan.from_json("[]")


def test_groups_above_max_degree_are_rejected():
    capped = CostModel(quad_ms=0.0, lin_ms=1.0, beta_ms=1.0, act_mb_per_token=1.0, memory_budget_gb=1.0, max_degree=4)
    with pytest.raises(ValueError, match="micro-batch 1 group 0 has 8 ranks but cost model 'custom' allows at most 4"):
        make_plan().validate(LENGTHS[:5] + [1], capped)

"""planner.megatron_dcp against cases traced by hand through Megatron-core's source
(NVIDIA/Megatron-LM dev @ d48bd6be, data_schedule_utils.next_hdp_group_packing_aware)."""

from __future__ import annotations

import pytest

from planner import CostModel
from planner.megatron_dcp import cp_min, max_tokens_per_rank, megatron_dynamic_cp, schedule


def per_rank_ids(microbatches, total):
    """Megatron's own output shape: per micro-batch, each rank's list of sample ids."""
    out = []
    for groups in microbatches:
        ranks = [None] * total
        for g in groups:
            for r in g.ranks:
                ranks[r] = g.ids
        out.append(ranks)
    return out


def test_cp_min_is_the_next_power_of_two_of_length_over_m():
    assert [cp_min(s, 100) for s in (1, 100, 101, 200, 201, 1600)] == [1, 1, 2, 2, 4, 16]
    assert cp_min(50, 100, min_cp_size=4) == 4


def test_short_sequences_open_new_groups_and_join_under_the_packing_limit():
    # 150 opens a CP-2 group (packed 75, workload 11250; cap 1.05 * 150 * 100 = 15750); 80 and
    # 60 cannot join it (75 + 40 > 100, 75 + 30 > 100) and open CP-1 groups; 30 joins 60's
    # group (projected max 11250), not 80's (80 + 30 > 100) nor CP-2 (11700 is not less).
    assert per_rank_ids(schedule(list(enumerate([150, 80, 60, 30])), 4, 100), 4) == [[[0], [0], [1], [2, 3]]]


def test_idle_ranks_double_the_smallest_group_first_in_creation_order():
    # 100 and 50 on CP-1 groups leave ranks 2, 3 idle: the first CP-1 group doubles onto rank 1
    # (pushing the other to rank 2), then the other doubles onto rank 3.
    groups = schedule(list(enumerate([100, 50])), 4, 100)
    assert per_rank_ids(groups, 4) == [[[0], [0], [1], [1]]]
    assert [g.ranks for g in groups[0]] == [[0, 1], [2, 3]]
    # the workload is re-summed at the new size: 100² / 2
    assert groups[0][0].load == 5000.0


def test_a_sequence_without_a_candidate_waits_for_the_next_microbatch():
    # Two ranks full at 100 tokens each: the third 100 goes to a second micro-batch, whose
    # single CP-1 group then doubles over both ranks.
    assert per_rank_ids(schedule(list(enumerate([100, 100, 100])), 2, 100), 2) == [[[0], [1]], [[2], [2]]]


def test_priced_plan_is_valid_and_keeps_the_longest_at_its_minimum_cp():
    cost = CostModel.preset("flexsp-gpt7b-a100", world_size=64)
    m = max_tokens_per_rank(cost, 64)
    assert m == cost.token_capacity(1)  # Ulysses: capacity is linear in the degree
    lengths = [150_000, 40_000, 9_000] + [700] * 200 + [3_000] * 40
    plan = megatron_dynamic_cp(lengths, num_ranks=64, cost=cost)
    plan.validate(lengths, cost)
    assert plan.solver == "megatron_dcp"
    longest = next(g for mb in plan.microbatches for g in mb.groups if 0 in g.seq_indices)
    assert longest.degree == cp_min(150_000, m)
    assert plan.lower_bound_s <= plan.predicted_time_s
    assert sum(mb.predicted_time_s for mb in plan.microbatches) == pytest.approx(plan.predicted_time_s)


def test_allgather_models_get_a_per_rank_limit_every_degree_holds():
    cost = CostModel.preset("hybrid-1b-h100", world_size=32)
    m = max_tokens_per_rank(cost, 32)
    assert all(d * m <= cost.token_capacity(d) for d in cost.degrees(32))
    lengths = [m * 20, m * 3] + [m // 7] * 100
    megatron_dynamic_cp(lengths, num_ranks=32, cost=cost).validate(lengths, cost)

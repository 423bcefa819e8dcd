"""planner.plan_step: exactness against exhaustive search, validity, determinism, fallbacks, errors."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time

import pytest

from planner import CostModel, StepPlan, plan_step
from planner import solver as solver_module
from planner.baselines import batch_adaptive
from planner.milp import MilpSolveError, solve_milp
from planner.solver import lower_bound_s

# Two small clusters with the features that matter: a bandwidth cliff at 8 ranks, constant
# per-group traffic and gathered K/V (LASP-2H-like), or a degree cap (Ulysses-like), model states.
TINY_COSTS = [
    CostModel(
        quad_ms=2e-4,
        lin_ms=0.05,
        beta_ms=20.0,
        act_mb_per_token=1.0,
        memory_budget_gb=1.0,
        seq_comm="allgather",
        comm_bytes_per_token=2**21,
        comm_bytes_per_group=5 * 2**20,
        bandwidth_gbps={2: 50, 4: 40, 8: 5},
        kv_gather_mb_per_token=0.05,
        name="tiny-allgather",
    ),
    CostModel(
        quad_ms=1e-4,
        lin_ms=0.2,
        beta_ms=60.0,
        act_mb_per_token=2.0,
        memory_budget_gb=1.5,
        model_state_gb=0.5,
        seq_comm="alltoall",
        comm_bytes_per_token=2**22,
        bandwidth_gbps={2: 100, 4: 90, 8: 9},
        max_degree=4,
        name="tiny-alltoall",
    ),
]


def tilings(num_ranks: int, cost: CostModel):
    """Every multiset of allowed power-of-two degrees summing to num_ranks (largest first)."""
    degrees = sorted(cost.degrees(num_ranks), reverse=True)

    def extend(rest, start):
        if rest == 0:
            yield ()
        for j in range(start, len(degrees)):
            if degrees[j] <= rest:
                for tail in extend(rest - degrees[j], j):
                    yield (degrees[j], *tail)

    yield from extend(num_ranks, 0)


def true_optimum_ms(lengths, num_ranks, cost) -> float:
    """Least makespan of one micro-batch over every tiling and every sequence-to-group map."""
    best = math.inf
    for tiling in tilings(num_ranks, cost):
        for labels in itertools.product(range(len(tiling)), repeat=len(lengths)):
            groups = [[s for s, g in zip(lengths, labels) if g == j] for j in range(len(tiling))]
            if all(cost.fits(group, d) for group, d in zip(groups, tiling)):
                best = min(best, max(cost.group_time_ms(group, d) for group, d in zip(groups, tiling)))
    return best


def pooled_optimum_ms(lengths, num_ranks, cost) -> float:
    """The MILP's own model by enumeration: group counts n_d, each sequence to a degree, work and
    memory pooled per degree: C = max(o_d + t(s, d) for each sequence, o_d + Σ t / n_d)."""
    best = math.inf
    for tiling in tilings(num_ranks, cost):
        counts = {d: tiling.count(d) for d in set(tiling)}
        for choice in itertools.product(sorted(counts), repeat=len(lengths)):
            makespan = 0.0
            for d, n in counts.items():
                items = [s for s, c in zip(lengths, choice) if c == d]
                if not items:
                    continue
                if max(items) > cost.token_capacity(d) or sum(items) > n * cost.token_capacity(d):
                    makespan = math.inf
                    break
                times = [cost.seq_time_ms(s, d) for s in items]
                makespan = max(makespan, cost.group_overhead_ms(d) + max(max(times), sum(times) / n))
            best = min(best, makespan)
    return best


def tiny_instances(count: int):
    """Random single-micro-batch instances (3-6 sequences, 4 or 8 ranks) that fit in one micro-batch."""
    rng = random.Random(7)
    found = []
    while len(found) < count:
        cost = rng.choice(TINY_COSTS)
        num_ranks = rng.choice([4, 8])
        per_rank = cost.token_capacity(1)
        k = rng.randint(3, 5 if num_ranks == 8 else 6)
        lengths = [rng.choice([rng.randint(20, per_rank), rng.randint(per_rank, 3 * per_rank)]) for _ in range(k)]
        cluster = max(num_ranks // d * cost.token_capacity(d) for d in cost.degrees(num_ranks))
        if sum(lengths) <= cluster and max(lengths) <= cost.max_sequence_length(num_ranks):
            optimum = true_optimum_ms(lengths, num_ranks, cost)
            if math.isfinite(optimum):
                found.append((lengths, num_ranks, cost, optimum))
    return found


INSTANCES = tiny_instances(30)


@pytest.mark.parametrize("lengths,num_ranks,cost,optimum", INSTANCES)
def test_milp_optimum_equals_enumeration_of_its_model(lengths, num_ranks, cost, optimum):
    # One sequence per bucket, so bucket means are exact; tolerance 2e-4 relative covers the
    # ε = 1e-4 rank-time tie-break in the objective (the solver gap is 1e-9 here).
    result = solve_milp([[s] for s in lengths], num_ranks=num_ranks, cost=cost, time_limit_s=10, mip_gap=1e-9)
    assert result.optimal
    pooled = pooled_optimum_ms(lengths, num_ranks, cost)
    assert result.makespan_ms == pytest.approx(pooled, rel=2e-4)
    assert result.bound_ms <= pooled * (1 + 1e-9) and pooled <= optimum * (1 + 1e-12)


@pytest.mark.parametrize("lengths,num_ranks,cost,optimum", INSTANCES)
def test_plan_equals_brute_force_optimum(lengths, num_ranks, cost, optimum):
    # One micro-batch (M_min = 1, no extra M): the plan's makespan under the cost model must be
    # the best over every tiling and assignment. Tolerance: float rounding only (1e-9 relative).
    plan = plan_step(lengths, num_ranks=num_ranks, cost=cost, extra_microbatches=0, mip_gap=1e-9)
    plan.validate(lengths, cost)
    assert len(plan.microbatches) == 1
    assert plan.predicted_time_s * 1e3 == pytest.approx(optimum, rel=1e-9)
    assert plan.lower_bound_s * 1e3 <= optimum * (1 + 1e-12)


def long_tailed(seed: int, n: int = 512, cap: int = 192 * 1024) -> list[int]:
    """Log-normal body (μ = 5.95, σ = 1.26, FlexSP's Wikipedia fit) with a 2% Pareto tail from 8K."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        s = 8192 * rng.paretovariate(1.1) if rng.random() < 0.02 else math.exp(rng.gauss(5.95, 1.26))
        lengths.append(max(1, min(cap, int(s))))
    return lengths


@pytest.mark.parametrize("preset,num_ranks", [("flexsp-gpt7b-a100", 64), ("hybrid-1b-h100", 32), ("tiny-cpu", 4)])
def test_plans_are_valid_and_no_worse_than_batch_adaptive(preset, num_ranks):
    cost = CostModel.preset(preset, world_size=num_ranks)
    cap = cost.max_sequence_length(num_ranks)
    lengths = [min(s, cap) for s in long_tailed(1, n=256 if num_ranks > 4 else 16, cap=cap)]
    plan = plan_step(lengths, num_ranks=num_ranks, cost=cost)
    plan.validate(lengths, cost)
    assert plan.solver in ("combinatorial", "highs", "batch_adaptive")
    assert plan.lower_bound_s <= plan.predicted_time_s
    assert plan.predicted_time_s <= batch_adaptive(lengths, num_ranks=num_ranks, cost=cost).predicted_time_s
    assert sum(mb.predicted_time_s for mb in plan.microbatches) == pytest.approx(plan.predicted_time_s, rel=1e-12)
    for mb in plan.microbatches:
        slowest = max(cost.group_time_ms([lengths[i] for i in g.seq_indices], g.degree) for g in mb.groups)
        assert slowest / 1e3 == pytest.approx(mb.predicted_time_s, rel=1e-9)
    assert StepPlan.from_json(plan.to_json()) == plan


def test_plan_is_deterministic():
    cost = CostModel.preset("flexsp-gpt7b-a100")
    lengths = long_tailed(3)
    first = plan_step(lengths, num_ranks=64, cost=cost, time_limit_s=5.0)
    second = plan_step(list(lengths), num_ranks=64, cost=cost, time_limit_s=5.0)
    assert first.microbatches == second.microbatches
    assert (first.predicted_time_s, first.solver, first.lower_bound_s) == (
        second.predicted_time_s,
        second.solver,
        second.lower_bound_s,
    )


def test_solve_time_sanity(capsys):
    """Not an assertion on speed: prints the solve time of one 512-sequence step on 64 ranks."""
    cost = CostModel.preset("flexsp-gpt7b-a100")
    lengths = long_tailed(0)
    start = time.perf_counter()
    plan = plan_step(lengths, num_ranks=64, cost=cost)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[planner] 512 sequences, 64 ranks, flexsp-gpt7b-a100: solved in {elapsed:.3f} s: {plan.summary()}")
    plan.validate(lengths, cost)


def test_cbc_backend():
    cost = TINY_COSTS[0]
    lengths = [300, 1500, 700, 2500, 90, 1200]
    plan = plan_step(lengths, num_ranks=8, cost=cost, solver="cbc")
    plan.validate(lengths, cost)
    assert plan.solver in ("cbc", "combinatorial", "batch_adaptive")
    highs = plan_step(lengths, num_ranks=8, cost=cost)
    assert plan.predicted_time_s == pytest.approx(highs.predicted_time_s, rel=2e-2)


def test_greedy_fallback_when_the_milp_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise MilpSolveError("solver crashed", "error")

    monkeypatch.setattr(solver_module, "solve_milp", broken)
    cost = TINY_COSTS[0]
    lengths = [300, 1500, 700, 2500, 90, 1200, 40, 800]
    plan = plan_step(lengths, num_ranks=8, cost=cost)
    plan.validate(lengths, cost)
    assert plan.solver in ("combinatorial", "batch_adaptive")


def test_greedy_when_no_solver_is_installed(monkeypatch):
    monkeypatch.setattr(solver_module, "available_solvers", lambda: [])
    cost = TINY_COSTS[1]
    lengths = [300, 1500, 700, 90]
    plan = plan_step(lengths, num_ranks=8, cost=cost)
    plan.validate(lengths, cost)
    assert plan.solver in ("combinatorial", "batch_adaptive")


def test_tiny_time_limit_still_gives_a_valid_plan():
    cost = CostModel.preset("flexsp-gpt7b-a100")
    lengths = long_tailed(5, n=128)
    plan = plan_step(lengths, num_ranks=64, cost=cost, time_limit_s=1e-3)
    plan.validate(lengths, cost)


def test_drop_policy(caplog):
    cost = TINY_COSTS[1]  # max_degree 4 caps the longest sequence below what 8 ranks could hold
    limit = cost.max_sequence_length(8)
    lengths = [100, limit + 1, 200, limit, 10 * limit]
    with pytest.raises(ValueError, match=rf"lengths\[1\] = {limit + 1} tokens exceeds .* \({limit} tokens"):
        plan_step(lengths, num_ranks=8, cost=cost)
    plan = plan_step(lengths, num_ranks=8, cost=cost, max_len_policy="drop")
    assert plan.dropped == [1, 4]
    plan.validate(lengths, cost)
    assert "dropping 2 sequence(s)" in caplog.text
    with pytest.raises(ValueError, match="every sequence exceeds"):
        plan_step([limit + 1], num_ranks=8, cost=cost, max_len_policy="drop")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lengths": []}, "the batch is empty"),
        ({"lengths": [5, 0, 3]}, r"lengths\[1\]: got 0"),
        ({"lengths": [5, -2]}, r"lengths\[1\]: got -2"),
        ({"lengths": [5, 2.5]}, r"lengths\[1\]: got 2.5"),
        ({"lengths": [5, True]}, r"lengths\[1\]: got True"),
        ({"lengths": "abc"}, "not a sequence"),
        ({"num_ranks": 6}, "power-of-two number of ranks"),
        ({"num_ranks": 0}, "power-of-two number of ranks"),
        ({"solver": "gurobi"}, "solver: got 'gurobi'"),
        ({"max_len_policy": "truncate"}, "max_len_policy"),
        ({"time_limit_s": 0}, "time_limit_s"),
        ({"num_buckets": 0}, "num_buckets"),
        ({"mip_gap": 1.5}, "mip_gap"),
        ({"cost": "flexsp-gpt7b-a100"}, "expected a planner.cost.CostModel"),
    ],
)
def test_bad_inputs(kwargs, message):
    args = {"lengths": [100, 200], "num_ranks": 8, "cost": TINY_COSTS[0], **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_step(args.pop("lengths"), **args)


def test_numpy_lengths_are_accepted():
    np = pytest.importorskip("numpy")
    cost = TINY_COSTS[0]
    lengths = np.array([300, 1500, 700], dtype=np.int64)
    plan = plan_step(lengths, num_ranks=8, cost=cost)
    assert plan.microbatches == plan_step([300, 1500, 700], num_ranks=8, cost=cost).microbatches
    plan.validate([300, 1500, 700], cost)


def test_lower_bound_is_below_every_baseline():
    cost = CostModel.preset("flexsp-gpt7b-a100")
    lengths = long_tailed(2, n=200)
    bound = lower_bound_s(lengths, num_ranks=64, cost=cost)
    assert 0 < bound <= batch_adaptive(lengths, num_ranks=64, cost=cost).predicted_time_s


def test_plan_does_not_depend_on_the_clock(monkeypatch):
    # Whatever the machine load, the plan is the same: a clock that jumps 10 s at every reading
    # (as if every step were starved) and a tiny safety cap give the plan of an idle machine.
    cost = CostModel.preset("flexsp-gpt7b-a100")
    lengths = long_tailed(4)
    idle = plan_step(lengths, num_ranks=64, cost=cost, time_limit_s=100.0)
    ticks = iter(range(0, 10**9, 10))
    monkeypatch.setattr(solver_module.time, "perf_counter", lambda: float(next(ticks)))
    starved = plan_step(list(lengths), num_ranks=64, cost=cost, time_limit_s=1e-3)
    assert starved.microbatches == idle.microbatches
    assert (starved.predicted_time_s, starved.solver, starved.lower_bound_s) == (
        idle.predicted_time_s,
        idle.solver,
        idle.lower_bound_s,
    )


def test_thousands_of_ranks_are_planned_whole():
    # 1,024 ranks x 8 sequences per rank in one plan (no pods): valid, memory-feasible, and the
    # lower bound holds. Not a timing assertion; `seqmoe bench planner --scale` measures time.
    cost = CostModel.preset("flexsp-gpt7b-a100", world_size=1024)
    lengths = long_tailed(6, n=8 * 1024)
    plan = plan_step(lengths, num_ranks=1024, cost=cost)
    plan.validate(lengths, cost)
    assert plan.lower_bound_s <= plan.predicted_time_s
    assert plan.gap_to_lower_bound == pytest.approx(plan.predicted_time_s / plan.lower_bound_s - 1)


def any_size_instances(count: int):
    """Tiny single-micro-batch instances on 3 or 6 ranks with groups of any size."""
    rng = random.Random(11)
    found = []
    while len(found) < count:
        cost = dataclasses.replace(TINY_COSTS[0], group_sizes="any")
        num_ranks = rng.choice([3, 6])
        per_rank = cost.token_capacity(1)
        k = rng.randint(3, 5)
        lengths = [rng.choice([rng.randint(20, per_rank), rng.randint(per_rank, 3 * per_rank)]) for _ in range(k)]
        cluster = max(num_ranks // d * cost.token_capacity(d) for d in cost.degrees(num_ranks))
        if sum(lengths) <= cluster and max(lengths) <= cost.max_sequence_length(num_ranks):
            optimum = true_optimum_ms(lengths, num_ranks, cost)
            if math.isfinite(optimum):
                found.append((lengths, num_ranks, cost, optimum))
    return found


@pytest.mark.parametrize("lengths,num_ranks,cost,optimum", any_size_instances(12))
def test_any_group_size_plan_equals_brute_force_optimum(lengths, num_ranks, cost, optimum):
    # group_sizes='any' on 3 or 6 ranks: the plan's makespan is the best over every tiling by
    # blocks of any size and every assignment. Tolerance: float rounding only (1e-9 relative).
    plan = plan_step(lengths, num_ranks=num_ranks, cost=cost, extra_microbatches=0, mip_gap=1e-9)
    plan.validate(lengths, cost)
    assert plan.group_sizes == "any" and len(plan.microbatches) == 1
    assert plan.predicted_time_s * 1e3 == pytest.approx(optimum, rel=1e-9)
    assert StepPlan.from_json(plan.to_json()) == plan


def test_groups_of_three_beat_powers_of_two_on_five_long_sequences():
    # FCP's case: 5 equal sequences that each need 2 ranks, on 16 ranks. Powers of two leave
    # some on groups of 2 (e.g. 4+4+4+2+2); any size gives each at least 3 (3+3+3+3+4).
    cost = dataclasses.replace(TINY_COSTS[0], group_sizes="any")
    lengths = [cost.token_capacity(2)] * 5
    pow2 = plan_step(lengths, num_ranks=16, cost=TINY_COSTS[0])
    anysize = plan_step(lengths, num_ranks=16, cost=cost)
    anysize.validate(lengths, cost)
    assert anysize.predicted_time_s < pow2.predicted_time_s
    assert min(g.degree for g in anysize.microbatches[0].groups if g.seq_indices) >= 3
    with pytest.raises(ValueError, match="powers of two"):
        anysize.validate(lengths, TINY_COSTS[0])
    # The option is a plan_step argument too, and the plan records it.
    assert plan_step(lengths, num_ranks=16, cost=TINY_COSTS[0], group_sizes="any").group_sizes == "any"


def test_a_cost_model_that_prices_a_tiny_batch_at_zero_still_plans():
    """A calibrated fit may set every compute coefficient to 0 (timings too small to resolve): the
    planner's bin counts must not divide 0 by 0 (a NaN once stopped ``seqmoe bench e2e``)."""
    import dataclasses

    from planner import plan_step
    from planner.cost import CostModel

    zero = dataclasses.replace(CostModel.preset("tiny-cpu", world_size=2), quad_ms=0.0, lin_ms=0.0, beta_ms=0.0)
    lengths = [64, 128, 100, 50]
    plan = plan_step(lengths, num_ranks=2, cost=zero)
    planned = sorted(i for micro in plan.microbatches for group in micro.groups for i in group.seq_indices)
    assert planned == list(range(len(lengths)))  # every sequence exactly once (exact, no tolerance)

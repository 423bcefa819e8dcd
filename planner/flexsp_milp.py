"""FlexSP's own planner as a baseline: virtual SP groups and one MILP per micro-batch.

FlexSP (Wang et al., ASPLOS'25, arXiv 2412.01523 §4.1, /work/shared/research/flexsp.md;
PKU-DAIR/Hetu-Galvatron@flexsp galvatron/flexsp_solver/solver.py) enumerates, for every
allowed degree d, N/d *virtual* groups p of degree d_p = d and solves, per micro-batch:

    minimise    C
    subject to  Σ_p d_p·m_p = N                                   selected groups tile the ranks
                Σ_p A_{q,p} = n_q                                 every sequence of bucket q placed
                A_{q,p} ≤ n_q·m_p,  Σ_q A_{q,p} ≥ m_p             only selected groups, none empty
                o_{d_p}·m_p + Σ_q A_{q,p}·t(ŝ_q, d_p) ≤ C        time of every group
                Σ_q A_{q,p}·ŝ_q ≤ κ_{d_p}·m_p                     memory of every group
                A_{q,p} = 0 where ŝ_q > κ_{d_p}                   (minSP of the bucket)

with m_p ∈ {0,1}, A_{q,p} ∈ ℤ≥0, buckets q of n_q sequences represented by their longest ŝ_q
(the optimal 1-D DP bucketing, planner.bucketing, Q = 16 as in FlexSP). Micro-batches: FlexSP's
sequence blaster, M = M_min … M_min + 4 consecutive min-max-token cuts of the sorted batch
(planner.bucketing.cut_microbatches), one MILP each, the M of least Σ makespan kept.

Differences from the artefact, all stated: HiGHS (through PuLP) instead of SCIP; the greedy
homogeneous warm start is kept as the micro-batch's plan when the MILP's incumbent is worse
or missing (what a warm start guarantees); within a degree, m_p ≥ m_{p+1} removes the
symmetric virtual groups (same optimum, fewer nodes); bucket sequences go to groups in index
order, not at random; when no M up to M_min + 4 is feasible (memory-bound presets), larger M
are tried until one is. The cost model is seqmoe's (planner.cost) with every degree it allows.

**This baseline depends on a wall-clock limit** (``time_limit_s`` per MILP, FlexSP uses
5–15 s): under load, or with a tighter limit, its plans get worse. Every result records the
limit, whether it bound, and the solve time. seqmoe's own planner (planner.solver) has no clock.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pulp

from planner.bucketing import cut_microbatches, optimal_buckets, sorted_order
from planner.checks import lower_bound_s, step_bounds, validate_batch
from planner.cost import CostModel
from planner.packing import Packing, TimeTable, homogeneous_packing, place_groups
from planner.plan import Group, MicroBatch, StepPlan

__all__ = ["FlexSPResult", "flexsp_milp_plan", "solve_microbatch"]

# FlexSP's defaults: 16 buckets, five micro-batch counts (mb_option_num in its CLI).
NUM_BUCKETS = 16
MB_OPTIONS = 5


@dataclass
class FlexSPResult:
    """One micro-batch's FlexSP solve."""

    groups: list[tuple[int, list[int]]]
    """(degree, sequence indices) per selected group."""
    makespan_ms: float
    """The cost model's makespan of those groups with the real lengths."""
    milp_status: str
    """'optimal', 'time_limit' (incumbent at the limit), 'no_solution' or 'infeasible'."""
    solve_s: float
    used_warm_start: bool


def _warm_start(seqs: list[int], local: dict[int, int], num_ranks: int, cost: CostModel) -> Packing | None:
    """FlexSP's greedy homogeneous warm start: the best single-degree LPT packing."""
    table = TimeTable(local, cost)
    best = None
    for d in cost.degrees(num_ranks):
        packing = homogeneous_packing(seqs, d, num_ranks, local, cost, table=table)
        if packing is not None and (best is None or packing.makespan_ms() < best.makespan_ms()):
            best = packing
    return best


def solve_microbatch(
    seqs: list[int],
    lengths: list[int],
    *,
    num_ranks: int,
    cost: CostModel,
    time_limit_s: float,
    num_buckets: int = NUM_BUCKETS,
    mip_gap: float = 0.0,
) -> FlexSPResult | None:
    """FlexSP's virtual-group MILP for one micro-batch (module docstring); None if neither the
    MILP nor the warm start finds a plan that fits in memory."""
    local = {i: lengths[i] for i in seqs}
    warm = _warm_start(seqs, local, num_ranks, cost)
    buckets = optimal_buckets([local[i] for i in seqs], num_buckets)
    members = [[seqs[k] for k in indices] for _, indices in buckets]
    tops = [rep for rep, _ in buckets]
    start = time.perf_counter()
    solution, status = _solve(members, tops, num_ranks, cost, time_limit_s, mip_gap)
    solve_s = time.perf_counter() - start
    milp = None
    if solution is not None:
        milp = Packing([d for d, _ in solution], local, cost)
        for b, (_, chosen) in zip(milp.bins, solution):
            for i in chosen:
                milp.add(i, b)
        if any(b.tokens > b.capacity for b in milp.bins):
            milp = None  # cannot happen (ŝ_q bounds every member); kept as a guard
    if milp is None and warm is None:
        return None
    use_warm = milp is None or (warm is not None and warm.makespan_ms() < milp.makespan_ms())
    chosen = warm if use_warm else milp
    groups = [(b.degree, sorted(b.members)) for b in chosen.bins if b.members]
    return FlexSPResult(groups, chosen.makespan_ms(), status, solve_s, use_warm)


def _solve(members, tops, num_ranks, cost, time_limit_s, mip_gap):
    """(list of (degree, sequence indices) per selected group, or None; status)."""
    n = num_ranks
    degrees = [d for d in cost.degrees(n) if cost.token_capacity(d) >= min(tops)]
    kappa = {d: cost.token_capacity(d) for d in degrees}
    overhead = {d: cost.group_overhead_ms(d) for d in degrees}
    virtual = [(d, c) for d in degrees for c in range(n // d)]
    sizes = [len(m) for m in members]
    prob = pulp.LpProblem("flexsp", pulp.LpMinimize)
    var = prob.add_variable
    c_var = var("C", 0)
    m = {p: var(f"m_{p[0]}_{p[1]}", 0, 1, cat="Binary") for p in virtual}
    a = {
        (q, p): var(f"A_{q}_{p[0]}_{p[1]}", 0, sizes[q], cat="Integer")
        for q in range(len(members))
        for p in virtual
        if tops[q] <= kappa[p[0]]
    }
    prob += c_var
    prob += pulp.lpSum(d * m[d, c] for d, c in virtual) == n, "tiling"
    for q, size in enumerate(sizes):
        prob += pulp.lpSum(v for (qq, _), v in a.items() if qq == q) == size, f"placed_{q}"
    for d, c in virtual:
        mine = [(q, v) for (q, p), v in a.items() if p == (d, c)]
        prob += pulp.lpSum(v for _, v in mine) >= m[d, c], f"nonempty_{d}_{c}"
        for q, v in mine:
            prob += v <= sizes[q] * m[d, c], f"selected_{q}_{d}_{c}"
        time_ms = pulp.lpSum(v * cost.seq_time_ms(tops[q], d) for q, v in mine)
        prob += overhead[d] * m[d, c] + time_ms <= c_var, f"time_{d}_{c}"
        prob += pulp.lpSum(v * tops[q] for q, v in mine) <= kappa[d] * m[d, c], f"memory_{d}_{c}"
        if c + 1 < n // d:
            prob += m[d, c] >= m[d, c + 1], f"order_{d}_{c}"
    solver = pulp.HiGHS(msg=False, timeLimit=max(time_limit_s, 1e-3), threads=1, gapRel=mip_gap, random_seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prob.solve(solver)
    except (pulp.PulpSolverError, KeyError):
        return None, "no_solution"
    status = _status(prob)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, status
    groups = []
    for d, c in virtual:
        if round(m[d, c].value() or 0) != 1:
            continue
        chosen = []
        for q in range(len(members)):
            v = a.get((q, (d, c)))
            chosen.append(0 if v is None else round(v.value() or 0))
        groups.append((d, chosen))
    # Bucket counts to sequences: each bucket's members in index order, groups in order.
    result, queues = [], [sorted(mq) for mq in members]
    for d, chosen in groups:
        picked = []
        for q, count in enumerate(chosen):
            picked += queues[q][:count]
            queues[q] = queues[q][count:]
        result.append((d, picked))
    return result, status


def _status(prob) -> str:
    if prob.sol_status == pulp.LpSolutionInfeasible:
        return "infeasible"
    model = getattr(prob, "solverModel", None)
    try:
        import highspy

        stopped = model.getModelStatus() == highspy.HighsModelStatus.kTimeLimit
    except (AttributeError, ImportError):
        stopped = False
    if prob.sol_status == pulp.LpSolutionOptimal and not stopped:
        return "optimal"
    if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return "time_limit" if stopped else "feasible"
    return "no_solution"


def flexsp_milp_plan(
    lengths: list[int],
    *,
    num_ranks: int,
    cost: CostModel,
    time_limit_s: float = 5.0,
    mb_options: int = MB_OPTIONS,
    num_buckets: int = NUM_BUCKETS,
    max_extra_microbatches: int = 64,
) -> tuple[StepPlan, dict]:
    """FlexSP's plan of a batch (module docstring) and a record of its solve: the limit, the
    number of MILPs, how many hit the limit, the M tried and the total solve time."""
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s: got {time_limit_s}; must be > 0 seconds")
    start = time.perf_counter()
    validate_batch(lengths, num_ranks=num_ranks, cost=cost)
    lengths = [int(s) for s in lengths]
    kept = sorted_order(lengths)
    bound = step_bounds(lengths, num_ranks, cost)
    record = {"time_limit_s": time_limit_s, "milps": 0, "hit_limit": 0, "warm_start_kept": 0, "m_tried": []}
    best: tuple[list[FlexSPResult], float] | None = None
    m = bound.m_min
    last = min(len(kept), bound.m_min + max_extra_microbatches - 1)
    while m <= last and (m < bound.m_min + mb_options or best is None):
        cut = cut_microbatches([lengths[i] for i in kept], m)
        results = []
        for lo, hi in cut:
            solved = solve_microbatch(
                kept[lo:hi], lengths, num_ranks=num_ranks, cost=cost, time_limit_s=time_limit_s, num_buckets=num_buckets
            )
            record["milps"] += 1
            if solved is None:
                results = None
                break
            record["hit_limit"] += solved.milp_status == "time_limit"
            record["warm_start_kept"] += solved.used_warm_start
            results.append(solved)
        record["m_tried"].append(m)
        if results is not None:
            total = sum(r.makespan_ms for r in results)
            if best is None or total < best[1]:
                best = (results, total)
        m += 1
    if best is None:
        raise ValueError(f"FlexSP MILP: no feasible plan with up to {m - 1} micro-batches")
    microbatches = []
    for r in best[0]:
        spare = num_ranks - sum(d for d, _ in r.groups)
        layout = r.groups + [(1, [])] * spare
        ranks = place_groups([d for d, _ in layout])
        groups = sorted((Group(rk, seqs) for rk, (_, seqs) in zip(ranks, layout)), key=lambda g: g.ranks[0])
        microbatches.append(MicroBatch(groups, r.makespan_ms / 1e3))
    plan = StepPlan(
        microbatches=microbatches,
        num_ranks=num_ranks,
        predicted_time_s=math.fsum(r.makespan_ms for r in best[0]) / 1e3,
        solver="flexsp_milp",
        solve_time_s=0.0,
        lower_bound_s=lower_bound_s(lengths, num_ranks=num_ranks, cost=cost),
    )
    plan.validate(lengths, cost)
    plan.solve_time_s = time.perf_counter() - start
    record["solve_time_s"] = plan.solve_time_s
    return plan, record

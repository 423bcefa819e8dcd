"""The per-micro-batch MILP: how many SP groups of each degree, and which buckets go where.

Notation: buckets q of m_q sequences with maximum ŝ_q and mean s̄_q; allowed degrees d
(powers of two ≤ N with token_capacity(d) ≥ ŝ_q for x_{q,d} to exist); t̂_{q,d} = t(ŝ_q, d)
and t̄_{q,d} = the bucket's mean of t(s, d) (planner.cost: exact for the bucket's total work);
o_d = cost.group_overhead_ms(d) (β plus constant traffic); κ_d = token_capacity(d); L ≤ C ≤ U
known bounds on the optimum (lower_bound_ms, upper_bound_ms).

Variables: n_d = Σ_k 2^k·b_{d,k} groups of degree d (b binary: one encoding per count, so
there are no symmetric virtual groups), x_{q,d} ∈ ℤ≥0 sequences of bucket q on degree d,
y_{q,d} ∈ {0,1} (x_{q,d} > 0 ⇒ y_{q,d} = 1), z_{d,k} ∈ [0, U] standing for b_{d,k}·C, C ∈ [L, U].

    minimise    C + ε·W/N,  W = Σ_{q,d} d·x_{q,d}·t̄_{q,d}   (rank-time; ε keeps slack for packing)
    subject to  Σ_d d·n_d = N                                  groups tile the ranks
                Σ_d x_{q,d} = m_q                              every sequence placed
                x_{q,d} ≤ m_q·y_{q,d},  C ≥ (o_d + t̂_{q,d})·y_{q,d}    the longest fits in C
                y_{q,d} ≤ n_d                                  (implied; tightens the LP)
                Σ_q x_{q,d}·t̄_{q,d} + o_d·n_d ≤ Σ_k 2^k·z_{d,k}        degree-d work ≤ n_d·C
                z_{d,k} ≤ C − L·(1 − b_{d,k}),  z_{d,k} ≤ U·b_{d,k}     (McCormick, exact at b ∈ {0,1})
                Σ_q x_{q,d}·s̄_q ≤ κ_d·n_d                     degree-d tokens fit in memory
                N·C ≥ W + Σ_d d·o_d·n_d                        (implied; tightens the LP)

The product n_d·C is linearised exactly: Σ_k 2^k z_{d,k} can reach Σ_k 2^k b_{d,k}·C = n_d·C
and no more, which is all the work constraint needs (as long as L ≤ C ≤ U). Work and memory are
pooled per degree (a relaxation of packing into individual groups) and use bucket means (so
a bucket that fits as a whole is never refused); the groups are then packed for real
(planner.packing). With one sequence per bucket the model is exact up to that pooling.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pulp

from planner.cost import CostModel

__all__ = ["DEFAULT_MIP_GAP", "MilpResult", "MilpSolveError", "available_solvers", "solve_milp", "upper_bound_ms"]

# Relative optimality gap at which a solve stops. Proving the last percent takes HiGHS 5–20x
# longer on 512-sequence batches (0.3–2 s instead of 0.03–0.3 s), and the packing after the MILP
# moves the real makespan by more than that anyway.
DEFAULT_MIP_GAP = 1e-2
# Rank-time tie-break weight: moves C by at most ~1e-4 relative (W/N ≈ C).
_EPSILON = 1e-4
# Work limits, not the clock, bound a solve: one thread, a fixed seed and a branch-and-bound node
# limit make the result a function of the input alone. The planner gives the MILP only small
# slices (planner.solver), which close in well under this many nodes.
MAX_NODES = 20_000
_HIGHS_OPTIONS = {"random_seed": 0, "mip_max_nodes": MAX_NODES}


class MilpSolveError(RuntimeError):
    """No usable MILP solution. ``kind``: 'error' (the solver crashed or is missing),
    'infeasible' (proven), or 'no_solution' (stopped at its limit without an incumbent)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class MilpResult:
    counts: dict[int, int]
    """n_d: groups per degree (degrees with zero groups omitted)."""
    assignment: dict[tuple[int, int], int]
    """x_{q,d}: sequences of bucket q run on degree d (zeros omitted)."""
    makespan_ms: float
    """C of the incumbent."""
    bound_ms: float
    """The solver's proven lower bound on C (equals C when optimal)."""
    optimal: bool
    solver: str
    stopped_by_clock: bool = False
    """The safety time limit, not the node limit or the gap, ended the solve (timing-dependent)."""


def available_solvers() -> list[str]:
    """'highs' and/or 'cbc', as PuLP can run them here."""
    found = pulp.listSolvers(onlyAvailable=True)
    return [name for name, key in (("highs", "HiGHS"), ("cbc", "PULP_CBC_CMD")) if key in found]


def solve_milp(
    buckets: list[list[int]],
    *,
    num_ranks: int,
    cost: CostModel,
    time_limit_s: float,
    solver: str = "highs",
    mip_gap: float = DEFAULT_MIP_GAP,
) -> MilpResult:
    """Solve the module's MILP for ``buckets`` (lists of lengths) to relative gap ``mip_gap``;
    raise MilpSolveError on failure."""
    stats = _BucketStats(buckets, num_ranks, cost)
    prob, var = _build(stats, num_ranks=num_ranks, cost=cost, upper_bound=upper_bound_ms(stats, num_ranks, cost))
    backend = _make_solver(solver, time_limit_s, mip_gap)
    start = time.perf_counter()
    try:
        prob.solve(backend)
    except (pulp.PulpSolverError, KeyError) as exc:
        # KeyError: PuLP 3.3's HiGHS status table lacks some statuses (memory or solution limits).
        raise MilpSolveError(f"{solver}: {exc!r}", "error") from exc
    elapsed = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = pulp.LpSolution.get(prob.sol_status, prob.sol_status)
        kind = "infeasible" if prob.sol_status == pulp.LpSolutionInfeasible else "no_solution"
        raise MilpSolveError(f"{solver}: no solution ({status}) after {elapsed:.3f} s", kind)
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    result = _extract(prob, var, num_ranks=num_ranks, solver=solver, optimal=optimal)
    result.stopped_by_clock = not optimal and _hit_time_limit(prob, elapsed, time_limit_s)
    return result


def _hit_time_limit(prob, elapsed: float, time_limit_s: float) -> bool:
    """HiGHS says why it stopped; for CBC, an unproven incumbent at the limit's wall time."""
    model = getattr(prob, "solverModel", None)
    try:
        import highspy

        return model.getModelStatus() == highspy.HighsModelStatus.kTimeLimit
    except (AttributeError, ImportError):
        return elapsed >= 0.9 * time_limit_s


class _BucketStats:
    """Per bucket: size m_q, max ŝ_q, mean s̄_q, and t̂, t̄ for every degree that holds ŝ_q."""

    def __init__(self, buckets: list[list[int]], num_ranks: int, cost: CostModel):
        self.sizes = [len(b) for b in buckets]
        self.tops = [max(b) for b in buckets]
        self.means = [sum(b) / len(b) for b in buckets]
        floor_degree = min(cost.min_degree(s, num_ranks) for s in self.tops)
        self.degrees = [d for d in cost.degrees(num_ranks) if d >= floor_degree]
        self.kappa = {d: cost.token_capacity(d) for d in self.degrees}
        self.overhead = {d: cost.group_overhead_ms(d) for d in self.degrees}
        self.pairs = [(q, d) for q, s in enumerate(self.tops) for d in self.degrees if self.kappa[d] >= s]
        self.t_top = {(q, d): cost.seq_time_ms(self.tops[q], d) for q, d in self.pairs}
        self.t_mean = {(q, d): sum(cost.seq_time_ms(s, d) for s in buckets[q]) / self.sizes[q] for q, d in self.pairs}


def upper_bound_ms(stats: _BucketStats, num_ranks: int, cost: CostModel) -> float:
    """U ≥ the MILP optimum: the best homogeneous solution of the MILP itself,
    C_d = o_d + max(max_q t̂_{q,d}, Σ_q m_q·t̄_{q,d} / (N/d)) over degrees that hold every bucket
    (aggregate memory included); else max_d o_d + Σ_q m_q·max_d t̂_{q,d}, which bounds every
    feasible solution's C."""
    best = math.inf
    for d in stats.degrees:
        groups = num_ranks // d
        on_d = [(q, d) for q in range(len(stats.sizes)) if (q, d) in stats.t_top]
        tokens = sum(m * s for m, s in zip(stats.sizes, stats.means))
        if len(on_d) < len(stats.sizes) or tokens > stats.kappa[d] * groups:
            continue
        work = sum(stats.sizes[q] * stats.t_mean[q, d] for q, _ in on_d) / groups
        best = min(best, stats.overhead[d] + max(max(stats.t_top[p] for p in on_d), work))
    if math.isfinite(best):
        return best
    worst = max(stats.overhead.values())
    for q, size in enumerate(stats.sizes):
        worst += size * max(t for (qq, _), t in stats.t_top.items() if qq == q)
    return worst


def _make_solver(solver: str, time_limit_s: float, mip_gap: float) -> pulp.LpSolver:
    limit = max(float(time_limit_s), 1e-3)
    if solver == "highs":
        return pulp.HiGHS(msg=False, timeLimit=limit, threads=1, gapRel=mip_gap, **_HIGHS_OPTIONS)
    if solver == "cbc":
        # PuLP 3.3 marks its bundled CBC deprecated (4.0 wants a separately installed one); it
        # is still the CBC that every PuLP install has, which is what a fallback needs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            options = ["randomSeed 1", f"maxNodes {MAX_NODES}"]
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, threads=1, gapRel=mip_gap, options=options)
    raise ValueError(f"solver: got {solver!r}; allowed: 'highs', 'cbc'")


def lower_bound_ms(stats: _BucketStats, num_ranks: int) -> float:
    """L ≤ the MILP optimum: the slowest bucket on its best degree, and the average rank load
    o_min + Σ_q m_q·min_d d·t̄_{q,d} / N."""
    buckets = range(len(stats.sizes))
    best_item = max(min(stats.overhead[d] + t for (qq, d), t in stats.t_top.items() if qq == q) for q in buckets)
    rank_time = sum(stats.sizes[q] * min(d * t for (qq, d), t in stats.t_mean.items() if qq == q) for q in buckets)
    return max(best_item, min(stats.overhead.values()) + rank_time / num_ranks)


def _build(stats: _BucketStats, *, num_ranks: int, cost: CostModel, upper_bound: float):
    n, degrees = num_ranks, stats.degrees
    t_top, t_mean, over = stats.t_top, stats.t_mean, stats.overhead
    upper = upper_bound * (1 + 1e-9) + 1e-9
    # Slightly below the bound so that float rounding never makes the model infeasible.
    lower = min(lower_bound_ms(stats, n) * (1 - 1e-9), upper)
    # Two exact reductions: a bucket cannot go where even one of its sequences exceeds U, and
    # where one sequence stays below L its "fits in C" row can never bind (no y needed).
    pairs = [p for p in stats.pairs if over[p[1]] + t_top[p] <= upper]
    binding = [p for p in pairs if over[p[1]] + t_top[p] > lower]

    prob = pulp.LpProblem("sp_plan", pulp.LpMinimize)
    var = prob.add_variable
    c = var("C", lower, upper)
    x = {p: var(f"x_{p[0]}_{p[1]}", 0, stats.sizes[p[0]], cat="Integer") for p in pairs}
    y = {p: var(f"y_{p[0]}_{p[1]}", 0, 1, cat="Binary") for p in binding}
    bits = {d: range((n // d).bit_length()) for d in degrees}
    b = {(d, k): var(f"b_{d}_{k}", 0, 1, cat="Binary") for d in degrees for k in bits[d]}
    z = {(d, k): var(f"z_{d}_{k}", 0, upper) for d in degrees for k in bits[d]}
    count = {d: pulp.lpSum((1 << k) * b[d, k] for k in bits[d]) for d in degrees}
    rank_time = pulp.lpSum(d * x[q, d] * t_mean[q, d] for q, d in pairs)

    prob += c + (_EPSILON / n) * rank_time
    prob += pulp.lpSum(d * count[d] for d in degrees) == n, "tiling"
    for q, size in enumerate(stats.sizes):
        prob += pulp.lpSum(x[p] for p in pairs if p[0] == q) == size, f"placed_{q}"
    for q, d in binding:
        prob += x[q, d] <= stats.sizes[q] * y[q, d], f"used_{q}_{d}"
        prob += y[q, d] <= count[d], f"open_{q}_{d}"
        prob += c >= (over[d] + t_top[q, d]) * y[q, d], f"item_{q}_{d}"
    for d in degrees:
        on_d = [p for p in pairs if p[1] == d]
        work = pulp.lpSum(x[p] * t_mean[p] for p in on_d)
        prob += work + over[d] * count[d] <= pulp.lpSum((1 << k) * z[d, k] for k in bits[d]), f"work_{d}"
        prob += pulp.lpSum(x[p] * stats.means[p[0]] for p in on_d) <= stats.kappa[d] * count[d], f"memory_{d}"
        for k in bits[d]:
            # McCormick upper envelope of z = b·C for b ∈ [0, 1], C ∈ [L, U]; exact at b ∈ {0, 1}.
            prob += z[d, k] <= c - lower * (1 - b[d, k]), f"zc_{d}_{k}"
            prob += z[d, k] <= upper * b[d, k], f"zb_{d}_{k}"
    prob += n * c >= rank_time + pulp.lpSum(d * over[d] * count[d] for d in degrees), "average"
    return prob, {"C": c, "x": x, "b": b, "bits": bits, "degrees": degrees}


def _extract(prob, var, *, num_ranks: int, solver: str, optimal: bool) -> MilpResult:
    counts = {}
    for d in var["degrees"]:
        value = sum((1 << k) * round(var["b"][d, k].value() or 0) for k in var["bits"][d])
        if value:
            counts[d] = value
    assignment = {p: round(v.value() or 0) for p, v in var["x"].items() if round(v.value() or 0)}
    if sum(d * k for d, k in counts.items()) != num_ranks:
        raise MilpSolveError(f"{solver}: solution does not tile {num_ranks} ranks: {counts}", "error")
    makespan = float(var["C"].value())
    return MilpResult(counts, assignment, makespan, _bound_on_c(prob, optimal), optimal, solver)


def _bound_on_c(prob, optimal: bool) -> float:
    """A proven lower bound on C. The objective C + ε·W/N is at most (1 + ε)·C because the
    'average' row gives W/N ≤ C, so C ≥ (objective bound) / (1 + ε). HiGHS reports the
    objective bound; CBC does not, so an unproven CBC incumbent gives 0."""
    model = getattr(prob, "solverModel", None)
    try:
        objective_bound = float(model.getInfo().mip_dual_bound)
    except AttributeError:
        objective_bound = pulp.value(prob.objective) if optimal else 0.0
    if not math.isfinite(objective_bound):
        objective_bound = 0.0
    return max(0.0, objective_bound) / (1 + _EPSILON)

"""The cost model's per-step term, identified apart from its per-micro-batch term.

A training step of a plan with M micro-batches, timed on its slowest rank, is modelled
(planner/cost.py) as

    step = S + Σ_m [B + c(d_m) + Σ_{s in m} t(s, d_m)]                                   (1)

    S = step_ms   what the step pays once whatever its plan: the balance buffer reset, the
                  gradient reduction at the accumulation boundary (inside the last backward),
                  the step's one metrics all-reduce and host read, the optimizer step;
    B = beta_ms   what every micro-batch pays whatever its sequences: the engine's forward and
                  backward hooks, the SPContext build and its agreement all-gather, the MoE
                  balance all-reduces, kernel launches.

``seqmoe profile`` times the bare model (no engine, no balance all-reduce) at every degree d
and length s, which fits B_raw + c(d) + t(s, d) (runtime/profile.py). B_raw is *not* the
training step's B, and one engine step of one micro-batch measures only S + B: S and B cannot
be told apart by steps that all have the same M. Timing such a step and subtracting its
micro-batch (the former ``_step_overhead_ms``) counted the per-micro-batch engine costs into S,
which the plan's M micro-batches then paid again through B_raw's share: each cost must be
counted once.

So the profile also runs real training steps (``runtime.step.train_step`` through the
DeepSpeed engine) of plans with different micro-batch counts M_i and known sequences, and
takes each one's residual over the bare-model prediction P_i = Σ_m [B_raw + c(d_m) + Σ t]:

    r_i = step_i − P_i = S + M_i·(B − B_raw) = S + M_i·δ                                  (2)

Two or more distinct M identify the intercept S and the slope δ: (2) is fitted by least
squares with weights 1/step_i (relative error, as the compute fit), under S ≥ 0 (when the
unconstrained S is negative, S = 0 and δ is refitted alone). The cost model then takes
step_ms = S and beta_ms = max(0, B_raw + δ); t(s, d) and c(d) are unchanged (δ is the same
for every degree and length). Fitting (2) to the steps' forward + backward time instead of
the whole step gives the part of S paid inside the last backward (the gradient reduction):
reported, not used.

The same fits on the busiest rank's process CPU time instead of wall time give a second model
(``clock="cpu"``) that a load from other jobs barely moves: on a shared machine, wall-clock
error mixes the model's error with the load's drift between calibration and measurement; the
CPU-time error is the model's alone (its communication terms are the wall-clock ones, a few
per cent of a step here).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from planner.cost import CostModel
from planner.plan import Group, MicroBatch, StepPlan

__all__ = [
    "StepFit",
    "StepPoint",
    "apply_step_fit",
    "calibration_steps",
    "fit_step_terms",
    "measure_engine_steps",
    "step_plan",
]

DEFAULT_COUNTS = (1, 2, 4, 8)
"""Micro-batch counts of the calibration steps: spread, so that (2)'s slope is well identified."""


@dataclass(frozen=True)
class StepPoint:
    """One calibration plan's slowest-rank median times (ms)."""

    microbatches: int
    length: int
    degrees: tuple[int, ...]
    """The SP degree of each micro-batch (every rank runs one ``length``-token sequence per group)."""
    step_ms: float
    fwd_bwd_ms: float
    step_cpu_ms: float = float("nan")
    """The step's process CPU time on its busiest rank (a shared machine's load barely moves it)."""


@dataclass(frozen=True)
class StepFit:
    """The solution of (2): S and δ (ms), from ``points`` measured steps."""

    step_ms: float
    delta_ms: float
    points: int


def fit_step_terms(points: list[tuple[int, float, float]]) -> StepFit:
    """(S, δ) of (2) from ``(M, predicted micro-batch ms P, measured ms)`` per step; needs two
    distinct M. Relative least squares, S >= 0 (δ may be negative: the bare model can pay
    per-micro-batch costs the engine path does not)."""
    counts = {m for m, _, _ in points}
    if len(counts) < 2:
        raise ValueError(
            f"fit_step_terms: steps with {len(counts)} distinct micro-batch count(s); the per-step and "
            "per-micro-batch terms need steps with at least two different counts"
        )
    M = np.array([float(m) for m, _, _ in points])
    residual = np.array([measured - predicted for _, predicted, measured in points])
    weight = 1.0 / np.maximum(np.array([measured for _, _, measured in points]), 1e-9)
    rows = np.stack([np.ones_like(M), M], axis=1) * weight[:, None]
    (S, delta), *_ = np.linalg.lstsq(rows, residual * weight, rcond=None)
    if S < 0:  # a step cannot pay a negative time once: refit the slope through the origin
        S = 0.0
        delta = float(np.dot(rows[:, 1], residual * weight) / np.dot(rows[:, 1], rows[:, 1]))
    return StepFit(step_ms=float(S), delta_ms=float(delta), points=len(points))


def apply_step_fit(
    bare: CostModel, points: list[StepPoint], *, clock: str = "wall"
) -> tuple[CostModel, StepFit, StepFit | None]:
    """``bare`` (the bare-model fit: B_raw, t, c) with step_ms = S and beta_ms = max(0, B_raw + δ)
    of (2) fitted to the whole ``points``; and the fits of (2) to the whole steps and to their
    forward + backward parts. ``clock="cpu"`` fits the steps' CPU times (``bare`` fitted to
    CPU times too; no forward + backward part: None)."""
    predicted = [math.fsum(bare.group_time_ms([p.length], d) for d in p.degrees) for p in points]
    measured = [p.step_cpu_ms if clock == "cpu" else p.step_ms for p in points]
    whole = fit_step_terms([(p.microbatches, b, m) for p, b, m in zip(points, predicted, measured)])
    inside = None
    if clock == "wall":
        inside = fit_step_terms([(p.microbatches, b, p.fwd_bwd_ms) for p, b in zip(points, predicted)])
    cost = dataclasses.replace(bare, beta_ms=max(0.0, bare.beta_ms + whole.delta_ms), step_ms=whole.step_ms)
    return cost, whole, inside


def step_plan(world_size: int, degrees: tuple[int, ...]) -> tuple[StepPlan, int]:
    """A plan whose micro-batch m tiles the ranks by buddy groups of ``degrees[m]``, one
    sequence per group; and the number of sequences it runs (its batch is that many)."""
    micro, index = [], 0
    for d in degrees:
        groups = []
        for start in range(0, world_size, d):
            groups.append(Group(tuple(range(start, start + d)), [index]))
            index += 1
        micro.append(MicroBatch(groups))
    plan = StepPlan(microbatches=micro, num_ranks=world_size, predicted_time_s=0.0, solver="static", solve_time_s=0.0)
    return plan, index


def calibration_steps(
    lengths: list[int], degrees: list[int], counts: tuple[int, ...] = DEFAULT_COUNTS
) -> list[tuple[int, tuple[int, ...]]]:
    """(length, per-micro-batch degrees) of every calibration step: each count M at the two
    shortest lengths, the micro-batches cycling through the degrees that divide the length."""
    steps = []
    for length in sorted(set(lengths))[:2]:
        usable = [d for d in degrees if length % d == 0]
        for m in counts:
            steps.append((length, tuple(usable[i % len(usable)] for i in range(m))))
    return steps


def measure_engine_steps(ctx, config, steps: list[tuple[int, tuple[int, ...]]], repeats: int) -> list[StepPoint]:
    """Slowest rank's median step and forward + backward ms of real training steps (runtime.step
    .train_step through runtime.train.build_engine's DeepSpeed engine, balance all-reduces on)
    for each ``(length, degrees)`` of ``steps``; the steps take turns, so that each repeat
    sees them under the same machine load."""
    from runtime.model import build_model
    from runtime.step import train_step
    from runtime.train import build_engine

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.parallel, config.moe, balance_group=ctx.world, seed=config.train.seed)
    engine = build_engine(model.to(ctx.device), config)
    W = ctx.world_size
    g = torch.Generator().manual_seed(config.train.seed)
    jobs = []
    for length, degrees in steps:
        plan, count = step_plan(W, degrees)
        sequences = [torch.randint(0, model.config.vocab_size, (length,), generator=g) for _ in range(count)]
        jobs.append((plan, SimpleNamespace(sequences=sequences, domains=[0] * count)))
    samples: list[list[tuple[float, float]]] = [[] for _ in jobs]
    for rep in range(repeats + 1):
        for i, (plan, batch) in enumerate(jobs):
            if W > 1:
                dist.barrier(group=ctx.world)
            start, cpu = time.perf_counter(), time.process_time()
            fwd_bwd_s = train_step(model, engine, ctx, plan, batch).forward_backward_s
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = [time.perf_counter() - start, fwd_bwd_s, time.process_time() - cpu]
            times = torch.tensor(elapsed, dtype=torch.float64)
            if W > 1:
                dist.all_reduce(times, op=dist.ReduceOp.MAX, group=ctx.world)
            if rep:  # the first round builds the optimizer state and warms up allocators
                samples[i].append(tuple(x * 1e3 for x in times.tolist()))
    return [
        StepPoint(
            microbatches=len(degrees),
            length=length,
            degrees=degrees,
            step_ms=statistics.median(s for s, _, _ in got),
            fwd_bwd_ms=statistics.median(f for _, f, _ in got),
            step_cpu_ms=statistics.median(c for _, _, c in got),
        )
        for (length, degrees), got in zip(steps, samples)
    ]

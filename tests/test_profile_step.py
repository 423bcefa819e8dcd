"""The per-step term of the cost model (runtime/step_profile.py): on synthetic steps whose
per-step and per-micro-batch costs are known, the fit recovers both, each counted once."""

from __future__ import annotations

import dataclasses
import random

import pytest

from planner.cost import CostModel
from runtime.step_profile import StepPoint, apply_step_fit, calibration_steps, fit_step_terms, step_plan

EXACT = 1e-9  # noiseless synthetic data: the least-squares fit is exact up to rounding
NOISY = 0.10  # ±2% noise on 4x8 steps of 0.2-2.5 s: S and δ within 10% of their true values


def _bare_model() -> CostModel:
    """A bare-model fit as runtime/profile.py makes it (B_raw, α, all-gather terms)."""
    return CostModel(
        quad_ms=4e-5,
        lin_ms=0.12,
        beta_ms=160.0,
        quad_sp_factor=1.7,
        act_mb_per_token=0.2,
        memory_budget_gb=4.0,
        seq_comm="allgather",
        comm_bytes_per_token=1024.0,
        comm_bytes_per_group=98304.0,
        bandwidth_gbps={2: 0.4, 4: 0.6},
    )


def _steps(truth: CostModel, lengths=(256, 512), noise: float = 0.0, seed: int = 0) -> list[StepPoint]:
    """Calibration steps timed under ``truth`` (its beta and step_ms are the engine's), with
    a relative noise of up to ``noise``."""
    rng = random.Random(seed)
    points = []
    for length, degrees in calibration_steps(list(lengths), [1, 2, 4]):
        micro = [truth.group_time_ms([length], d) for d in degrees]
        reduction = 0.2 * truth.step_ms  # the part of the step paid inside the last backward
        step = truth.step_time_ms(micro) * (1 + rng.uniform(-noise, noise))
        fwd_bwd = (sum(micro) + reduction) * (1 + rng.uniform(-noise, noise))
        points.append(StepPoint(len(degrees), length, degrees, step, fwd_bwd))
    return points


@pytest.mark.parametrize("beta, step_ms", [(110.0, 130.0), (190.0, 40.0), (160.0, 0.0)])
def test_fit_recovers_the_per_step_and_per_microbatch_terms(beta, step_ms):
    bare = _bare_model()
    truth = dataclasses.replace(bare, beta_ms=beta, step_ms=step_ms)
    cost, whole, inside = apply_step_fit(bare, _steps(truth))
    assert cost.step_ms == pytest.approx(step_ms, abs=EXACT * 1e3)
    assert cost.beta_ms == pytest.approx(beta, rel=EXACT)
    assert whole.delta_ms == pytest.approx(beta - bare.beta_ms, abs=EXACT * 1e3)
    # the forward + backward part: the same δ, and the reduction's share of S as its intercept
    assert inside.delta_ms == pytest.approx(whole.delta_ms, abs=EXACT * 1e3)
    assert inside.step_ms == pytest.approx(0.2 * step_ms, abs=EXACT * 1e3)
    # nothing else moves: the per-sequence and communication terms are the bare fit's
    assert dataclasses.replace(cost, beta_ms=bare.beta_ms, step_ms=0.0) == bare


def test_fit_recovers_the_terms_from_noisy_steps():
    bare = _bare_model()
    truth = dataclasses.replace(bare, beta_ms=120.0, step_ms=150.0)
    points = [p for seed in range(4) for p in _steps(truth, noise=0.02, seed=seed)]
    cost, _, _ = apply_step_fit(bare, points)
    assert cost.step_ms == pytest.approx(150.0, rel=NOISY)
    assert cost.beta_ms == pytest.approx(120.0, rel=NOISY)


def test_one_step_difference_double_counts_and_the_fit_does_not():
    # what the former estimate did: one single-micro-batch step minus the bare model's
    # micro-batch counts the engine's per-micro-batch cost (here +40 ms) into the per-step term
    bare = _bare_model()
    truth = dataclasses.replace(bare, beta_ms=bare.beta_ms + 40.0, step_ms=100.0)
    single = next(p for p in _steps(truth) if p.microbatches == 1)
    difference = single.step_ms - bare.group_time_ms([single.length], 1)
    assert difference == pytest.approx(140.0, rel=EXACT)
    cost, _, _ = apply_step_fit(bare, _steps(truth))
    assert cost.step_ms == pytest.approx(100.0, rel=EXACT)


def test_fit_needs_two_microbatch_counts():
    with pytest.raises(ValueError, match="at least two different counts"):
        fit_step_terms([(2, 100.0, 150.0), (2, 200.0, 260.0)])


def test_fit_keeps_the_per_step_term_non_negative():
    # residuals 20·M − 10: the unconstrained intercept would be −10 ms
    points = [(m, 100.0 * m, 100.0 * m + 20.0 * m - 10.0) for m in (1, 2, 4, 8)]
    fit = fit_step_terms(points)
    assert fit.step_ms == 0.0
    assert 0.0 < fit.delta_ms < 20.0  # the slope through the origin absorbs the intercept


def test_calibration_plans_tile_the_ranks_with_the_degrees_that_divide_the_length():
    steps = calibration_steps([1024, 256, 512, 256], [1, 2, 4, 8])
    assert [s[0] for s in steps] == [256] * 4 + [512] * 4  # the two shortest lengths
    assert [len(s[1]) for s in steps[:4]] == [1, 2, 4, 8]
    assert steps[3][1] == (1, 2, 4, 8, 1, 2, 4, 8)
    assert calibration_steps([12], [1, 2, 4, 8])[-1][1] == (1, 2, 4, 1, 2, 4, 1, 2)  # 8 does not divide 12
    plan, count = step_plan(4, (1, 2, 4))
    assert count == 4 + 2 + 1
    assert [[g.ranks for g in mb.groups] for mb in plan.microbatches] == [
        [(0,), (1,), (2,), (3,)],
        [(0, 1), (2, 3)],
        [(0, 1, 2, 3)],
    ]
    # every sequence runs once, in one group
    assert sorted(i for mb in plan.microbatches for g in mb.groups for i in g.seq_indices) == list(range(count))


def test_cpu_clock_fits_the_steps_cpu_times():
    bare = _bare_model()
    truth = dataclasses.replace(bare, beta_ms=130.0, step_ms=90.0)
    # wall times stretched 2x by a load that time-shares the cores; CPU times are the truth's
    points = [dataclasses.replace(p, step_cpu_ms=p.step_ms, step_ms=2 * p.step_ms) for p in _steps(truth)]
    cost, whole, inside = apply_step_fit(bare, points, clock="cpu")
    assert cost.step_ms == pytest.approx(90.0, rel=EXACT) and cost.beta_ms == pytest.approx(130.0, rel=EXACT)
    assert inside is None  # no CPU time of the forward + backward part is measured

"""Cost-model calibration: the fit recovers known coefficients, the communication volumes follow
the formulas of parallel/README.md, and an end-to-end profile on 2 gloo ranks writes a model."""

from __future__ import annotations

import math

import pytest

from planner.cost import CostModel
from runtime.config import load_config
from runtime.profile import (
    ProfileResult,
    calibration_points,
    comm_volumes,
    fit_coefficients,
    fit_spread,
    measure_quad_sp_factor,
    packed_lengths,
    profile_cost_model,
)

FIT_TOL = 1e-9  # noiseless synthetic data: the least-squares fit is exact up to rounding


def test_fit_recovers_known_coefficients():
    alpha1, alpha2, beta = 2e-6, 0.05, 3.0
    points = [(d, s, beta + (alpha1 * s * s + alpha2 * s) / d) for d in (1, 2, 4) for s in (256, 1024, 4096)]
    got = fit_coefficients(points)
    for x, y in zip(got, (alpha1, alpha2, beta)):
        assert abs(x - y) <= FIT_TOL * max(abs(y), 1.0)


def test_fit_with_given_factors_above_one_rank():
    alpha1, alpha2, beta, q, r = 2e-6, 0.05, 3.0, 1.7, 1.2
    points = [
        (d, s, beta + ((q if d > 1 else 1.0) * alpha1 * s * s + (r if d > 1 else 1.0) * alpha2 * s) / d)
        for d in (1, 2, 4)
        for s in (256, 1024, 4096)
    ]
    got = fit_coefficients(points, quad_sp_factor=q, lin_sp_factor=r)
    for x, y in zip(got, (alpha1, alpha2, beta)):
        assert abs(x - y) <= FIT_TOL * max(abs(y), 1.0)


def _spread_points(alpha1, alpha2, beta, q, r, *, packed=True):
    groups = [256, 512, 1024, 2048]
    if packed:
        groups += [packed_lengths(total, k) for total in (1024, 2048) for k in (2, 8)]
    points = []
    for d in (1, 2, 4):
        for g in groups:
            docs = (g,) if isinstance(g, int) else g
            qd, rd = (1.0, 1.0) if d == 1 else (q, r)
            points.append((d, g, beta + (qd * alpha1 * sum(s * s for s in docs) + rd * alpha2 * sum(docs)) / d))
    return points


def test_packed_points_identify_both_factors_above_one_rank():
    """q and r are fitted when groups pack several documents at d = 1 and above (exact data)."""
    truth = (3e-5, 0.3, 90.0, 1.3, 1.25)
    fit = fit_spread(_spread_points(*truth), quad_sp_factor=1.7)
    got = (fit.alpha1, fit.alpha2, fit.beta, fit.quad_sp_factor, fit.lin_sp_factor)
    for x, y in zip(got, truth):
        assert abs(x - y) <= FIT_TOL * max(abs(y), 1.0)
    assert fit.quad_fitted
    # distinct pieces (proportions k .. 2k - 1) summing to the total; near-equal when too short
    assert packed_lengths(2048, 8) == (178, 200, 222, 244, 267, 289, 311, 337)
    assert packed_lengths(1024, 2) == (409, 615) and packed_lengths(10, 8) == (2, 2, 1, 1, 1, 1, 1, 1)


def test_without_packed_points_q_is_the_kernels_and_r_is_still_fitted():
    """One document per group cannot separate s² from s above one rank: q falls back to the given
    kernel ratio (exact data made with that q), r is fitted."""
    truth = (3e-5, 0.3, 90.0, 1.7, 1.25)
    fit = fit_spread(_spread_points(*truth, packed=False), quad_sp_factor=1.7)
    assert not fit.quad_fitted and fit.quad_sp_factor == 1.7
    for x, y in zip((fit.alpha1, fit.alpha2, fit.beta, fit.lin_sp_factor), (3e-5, 0.3, 90.0, 1.25)):
        assert abs(x - y) <= FIT_TOL * max(abs(y), 1.0)


def test_a_softmax_term_fitted_to_zero_falls_back_to_the_kernel_ratio():
    """Data with no s² term at all: q is not identified (0/0), so the kernel's ratio is kept."""
    fit = fit_spread(_spread_points(0.0, 0.3, 90.0, 1.0, 1.25), quad_sp_factor=1.6)
    assert not fit.quad_fitted and fit.quad_sp_factor == 1.6
    assert fit.alpha1 <= 1e-12 and abs(fit.lin_sp_factor - 1.25) <= 1e-6 and abs(fit.alpha2 - 0.3) <= 1e-6


def test_calibration_points_stay_where_a_group_fits():
    """Every length a degree divides, one document and the two longest packed; with a capacity, only
    the groups that fit (and the shortest length where none does)."""
    lengths = [256, 512, 1024, 2048]
    everything = calibration_points(lengths, [1, 2])
    assert [p for p in everything if isinstance(p[1], int)] == [(d, s) for d in (1, 2) for s in lengths]
    packed = {(d, sum(g), len(g)) for d, g in everything if not isinstance(g, int)}
    assert packed == {(d, s, k) for d in (1, 2) for s in (1024, 2048) for k in (2, 8)}
    capped = calibration_points(lengths, [1, 2, 4], {1: 632, 2: 1238, 4: 100})
    single = [p for p in capped if isinstance(p[1], int)]
    assert single == [(1, 256), (1, 512), (2, 256), (2, 512), (2, 1024), (4, 256)]
    packed = {(d, sum(g), len(g)) for d, g in capped if not isinstance(g, int)}
    assert packed == {(1, s, k) for s in (256, 512) for k in (2, 8)} | {
        (2, s, k) for s in (512, 1024) for k in (2, 8)
    } | {(4, 256, k) for k in (2, 8)}


def test_quad_sp_factor_is_measured_on_the_kernel():
    import torch

    config = load_config(None, ["--model.ffn=dense", "--model.d_model=32"])
    q = measure_quad_sp_factor(config, 256, [1, 2], repeats=1, device=torch.device("cpu"))
    assert math.isfinite(q) and q > 0  # a ratio of two timings: no bound on its value is asserted
    assert measure_quad_sp_factor(config, 256, [1], repeats=1, device=torch.device("cpu")) == 1.0


def test_fit_keeps_coefficients_non_negative():
    # purely linear data with noise that would pull the quadratic term negative
    points = [(1, s, 0.1 * s - 1e-7 * s * s) for s in (100, 200, 400, 800)]
    alpha1, alpha2, beta = fit_coefficients(points)
    assert alpha1 >= 0 and alpha2 >= 0 and beta >= 0


def test_a_fit_whose_times_do_not_grow_with_the_tokens_is_flagged():
    """Flat timings (noise over a fixed cost) fit alpha1 = alpha2 = 0: every plan would cost the
    same, so the profile says so and names the fix; a fit with a per-token term is not flagged."""
    flat = [(d, s, 40.0 - 1e-3 * s / d) for d in (1, 2) for s in (256, 512, 1024)]  # noise that falls with s
    alpha1, alpha2, beta = fit_coefficients(flat)
    assert alpha1 == alpha2 == 0.0 and beta > 0

    def result(quad_ms: float, lin_ms: float) -> ProfileResult:
        cost = CostModel(quad_ms=quad_ms, lin_ms=lin_ms, beta_ms=beta, act_mb_per_token=0.1, memory_budget_gb=1.0)
        return ProfileResult(cost, [], {})

    (warning,) = result(alpha1, alpha2).warnings
    assert "do not grow with the tokens" in warning and "longer --lengths" in warning
    assert result(0.0, 0.01).warnings == [] and result(1e-6, 0.0).warnings == []


def test_comm_volumes_follow_the_formulas():
    config = load_config("configs/tiny-cpu.toml", ["--model.ffn=dense"])  # LLLS x 1, d=128, 4 heads, 2 kv
    kind, per_token, per_group = comm_volumes(config, elem_bytes=4)
    head_dim = 32
    assert kind == "allgather"
    assert per_token == 1 * 2 * 2 * 2 * head_dim * 4  # 1 softmax layer: K and V, fwd and bwd
    assert per_group == 3 * 2 * 4 * head_dim * head_dim * 4  # 3 linear layers: fp32 state fwd and bwd
    ulysses = load_config(None, ["--model.ffn=dense", "--parallel.linear_sp=ulysses", "--parallel.softmax_sp=ulysses"])
    kind, per_token, per_group = comm_volumes(ulysses, elem_bytes=2)
    assert kind == "alltoall" and per_group == 0.0
    with pytest.raises(ValueError, match="one kind of sequence-proportional traffic"):
        comm_volumes(load_config(None, ["--model.ffn=dense", "--parallel.linear_sp=ulysses"]), elem_bytes=4)


def test_bad_profile_arguments():
    config = load_config(None, ["--model.ffn=dense"])
    with pytest.raises(ValueError, match="power-of-two"):
        profile_cost_model(config, world_size=3, lengths=[96])
    with pytest.raises(ValueError, match="multiples of the number of processes"):
        profile_cost_model(config, world_size=2, lengths=[63])


@pytest.mark.slow
def test_profile_end_to_end_on_two_ranks():
    config = load_config(
        None,
        [
            "--model.ffn=dense",
            "--model.num_layers=2",
            "--model.layer_pattern=LS",
            "--model.d_model=32",
            "--parallel.backend=gloo",
            "--parallel.device=cpu",
        ],
    )
    result = profile_cost_model(config, world_size=2, lengths=[64, 128, 256], repeats=1)
    single = {(d, s, 1) for d in (1, 2) for s in (64, 128, 256)}
    packed = {(d, s, k) for d in (1, 2) for s in (128, 256) for k in (2, 8)}  # the two longest lengths
    assert {(p["degree"], p["length"], p["documents"]) for p in result.points} == single | packed
    assert all(sum(p["docs"]) == p["length"] and len(p["docs"]) == p["documents"] for p in result.points)
    assert set(result.bandwidth_gbps) == {2} and result.bandwidth_gbps[2] > 0
    cost = result.cost
    assert cost.act_mb_per_token > 0 and cost.memory_budget_gb > 0 and cost.model_state_gb > 0
    assert cost.step_ms >= 0 and cost.quad_sp_factor > 0 and cost.lin_sp_factor > 0  # S >= 0, fitted factors
    # the training steps of runtime/step_profile.py: 1, 2, 4, 8 micro-batches at the two shortest lengths
    assert sorted((p["length"], p["microbatches"]) for p in result.step_points) == [
        (s, m) for s in (64, 128) for m in (1, 2, 4, 8)
    ]
    assert result.step_fit["step_ms"] == cost.step_ms
    assert cost.beta_ms == max(0.0, result.step_fit["bare_beta_ms"] + result.step_fit["delta_beta_ms"])
    for p in result.step_points:  # each step priced as step_ms + its micro-batches, each counted once
        micro = [cost.group_time_ms([p["length"]], d) for d in p["degrees"]]
        assert p["predicted_ms"] == pytest.approx(cost.step_ms + sum(micro), rel=1e-12)
        assert p["measured_ms"] >= p["measured_fwd_bwd_ms"] > 0
    assert CostModel.from_json(cost.to_json()) == cost
    assert all(p["measured_ms"] > 0 and p["predicted_ms"] > 0 for p in result.points)

"""The benchmark scripts run end to end on tiny sizes and write well-formed JSON + PNG.
(No timing is asserted: benchmarks are not tests.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: int) -> None:
    """Run a benchmark; on failure the assertion carries the tail of its output (CI shows it)."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.slow
def test_sp_ops_benchmark_writes_its_results(tmp_path):
    cmd = [
        sys.executable,
        "benchmarks/sp_ops.py",
        "--world-sizes",
        "2",
        "--linear-lengths",
        "256",
        "--softmax-lengths",
        "128",
        "--delta-lengths",
        "128",
        "--repeats",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    _run(cmd, timeout=300)
    result = json.loads((tmp_path / "sp_ops.json").read_text())
    assert (tmp_path / "sp_ops.png").stat().st_size > 0
    assert {"machine", "config", "summary", "rows"} <= set(result)
    assert result["machine"]["git_revision"]
    methods = {(r["kind"], r["method"]) for r in result["rows"]}
    assert methods == {
        ("linear", "LASP-2"),
        ("linear", "Scan"),
        ("linear", "LASP-1"),
        ("delta", "LASP-2"),
        ("delta", "Scan"),
        ("delta", "LASP-1"),
        ("linear", "Ulysses"),
        ("softmax", "LASP-2H"),
        ("softmax", "Ulysses"),
    }
    lasp2 = next(r for r in result["rows"] if r["method"] == "LASP-2")
    # B=1, H=4, d=64 fp32 state; forward and backward, one peer (the runtime's in-context entry)
    assert lasp2["bytes_sent_max_rank"] == 4 * 64 * 64 * 4 + 4 * 64 * 64 * 4
    assert "W=2,T=256" in result["summary"]["lasp1_over_lasp2_time"]
    delta = next(r for r in result["rows"] if r["kind"] == "delta" and r["method"] == "LASP-2")
    # the delta rule gathers state and transition (4 x 64 x (64 + 64)) forward, dM backward
    assert delta["bytes_sent_max_rank"] == 4 * 64 * 128 * 4 + 4 * 64 * 64 * 4
    scan = next(r for r in result["rows"] if r["kind"] == "delta" and r["method"] == "Scan")
    assert scan["bytes_sent_max_rank"] == 4 * 64 * 64 * 4  # one state, forward or backward, per end rank


def test_bench_rejects_lengths_that_do_not_split(tmp_path):
    cmd = [
        sys.executable,
        "benchmarks/sp_ops.py",
        "--world-sizes",
        "3",
        "--linear-lengths",
        "256",
        "--out-dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not divisible" in result.stderr


def test_linear_kernels_benchmark_runs_on_cpu(tmp_path):
    cmd = [sys.executable, "benchmarks/linear_kernels.py", "--quick", "--out-dir", str(tmp_path)]
    _run(cmd, timeout=300)
    result = json.loads((tmp_path / "linear_kernels.json").read_text())
    assert result["config"]["device"] in ("cpu", "cuda") and result["rows"]
    assert (tmp_path / "linear_kernels.png").stat().st_size > 0


def test_planner_benchmark_writes_its_results(tmp_path):
    cmd = [sys.executable, "benchmarks/planner.py", "--quick", "--batches", "1", "--batch-size", "128"]
    _run([*cmd, "--out-dir", str(tmp_path)], timeout=300)
    result = json.loads((tmp_path / "planner.json").read_text())
    assert (tmp_path / "planner.png").stat().st_size > 0
    assert {"machine", "config", "summary", "rows"} <= set(result)
    assert result["config"]["num_ranks"] == 64 and result["config"]["batch_size"] == 128
    # FlexSP's own MILP ran side by side, with its wall-clock limit recorded
    flexsp = result["flexsp_milp"]
    assert flexsp and all(r["flexsp_milp_record"]["time_limit_s"] == 1.0 for r in flexsp)
    assert all(r["flexsp_milp_time_s"] >= r["lower_bound_s"] * (1 - 1e-9) for r in flexsp)
    # every cost-model preset x distribution, one batch each (the presets include tiny-cpu now)
    from planner.cost import CostModel

    cases = {(r["cost_model"], r["distribution"]) for r in result["rows"]}
    assert cases == {(c, d) for c in CostModel.presets() for d in ("wikipedia", "github", "commoncrawl")}
    for row in result["rows"]:
        assert row["speedup_vs_static"] == pytest.approx(row["static_time_s"] / row["predicted_time_s"])
        assert row["speedup_vs_megatron"] == pytest.approx(row["megatron_time_s"] / row["predicted_time_s"])
        assert row["speedup_vs_batch_adaptive"] > 0 and row["plan_wall_s"] > 0 and row["gap_to_lower_bound"] >= -1e-9
        assert row["same_plan_twice"] and row["any_gain"] > 0
    # the whole-cluster scale run (quick: 1024 ranks only) and the hybrid context sweep
    assert {r["num_ranks"] for r in result["scale"]} == {1024}
    assert [r["cap"] for r in result["context_sweep"]] == [2**15, 2**16, 2**17, 2**18, 2**19, 2**20]
    assert all(0 < r["softmax_share"] < 1 and r["vs_megatron"] > 0 for r in result["context_sweep"])
    summary = result["summary"]["flexsp-gpt7b-a100"]
    assert {"all", "wikipedia", "github", "commoncrawl"} <= set(summary)
    assert {"plan_wall_s", "speedup_vs_static", "speedup_vs_batch_adaptive", "gap_to_lower_bound"} <= set(
        summary["all"]
    )
    # GPT-7B on 64 A100s: only SP=64 holds a 192K-token sequence
    assert summary["all"]["static_degree"] == 64


@pytest.mark.slow
def test_moe_benchmark_writes_its_results(tmp_path):
    cmd = [sys.executable, "benchmarks/moe.py", "--quick", "--steps", "2", "--seeds", "1", "--seq-len", "64"]
    cmd += ["--val-batches", "1", "--repeats", "1", "--world-size", "2", "--out-dir", str(tmp_path)]
    _run(cmd, timeout=300)
    result = json.loads((tmp_path / "moe.json").read_text())
    assert (tmp_path / "moe.png").stat().st_size > 0 and (tmp_path / "moe_domains.png").stat().st_size > 0
    assert {"machine", "config", "summary", "overhead", "runs"} <= set(result)
    assert result["machine"]["git_revision"]
    variants = {"micro", "global", "global+gru", "global+coe"}
    assert {r["variant"] for r in result["runs"]} == variants
    assert {(r["ep_size"], r["weights"], r["variant"]) for r in result["overhead"]} == {
        (2, w, v) for w in ("init", "trained") for v in variants
    }
    for row in result["overhead"]:
        assert math.isfinite(row["median_wall_s"]) and row["median_wall_s"] > 0
        assert row["all_to_all_bytes_max_rank"] > 0
        # only global LBL adds an all-reduce (the counts of every MoE site, in one call per micro-batch)
        assert (row["all_reduce_calls"] > 0) == row["variant"].startswith("global")
    for run in result["runs"]:
        assert all(math.isfinite(run[key]) for key in ("val_loss", "specialisation_jsd", "max_vio_global_batch"))
        assert len(run["domain_frequency"]) == 4 * (2 if run["variant"] == "global+coe" else 1)
    quality = result["summary"]["quality"]
    assert set(quality["comparisons"]) == {"global_vs_micro", "gru_vs_linear", "coe_vs_moe"}
    assert all("val_loss_verdict" in c for c in quality["comparisons"].values())
    assert "specialisation_verdict" in quality["comparisons"]["global_vs_micro"]
    assert {"pooled", "ep=2,init", "ep=2,trained"} == set(result["summary"]["overhead"])
    for comparisons in result["summary"]["overhead"].values():
        assert all(math.isfinite(c["wall_overhead_pct"]) for c in comparisons.values())


def _write_profile(path: Path) -> Path:
    """A stand-in for a `seqmoe profile` output: the tiny-cpu preset's coefficients."""
    from planner.cost import CostModel

    path.write_text(CostModel.preset("tiny-cpu", world_size=2).to_json())
    return path


def test_e2e_prices_plans_and_skips_degrees_that_cannot_hold_the_batch():
    import dataclasses

    from benchmarks.e2e import calibrated_cost, predicted_s, predicted_step_s, skip_reason
    from planner.cost import CostModel
    from planner.solver import plan_step

    cost = calibrated_cost(CostModel.preset("tiny-cpu", world_size=4), world_size=4)
    assert cost.token_capacity(1) < 1024 <= cost.token_capacity(2)
    lengths = [1024, 600, 300, 80, 40, 900, 700, 20]
    plan = plan_step(lengths, num_ranks=4, cost=cost, time_limit_s=1.0)
    # the e2e benchmark re-prices executed plans; under the planner's own model it must agree
    assert predicted_s(plan, lengths, cost) == pytest.approx(plan.predicted_time_s, rel=1e-9)
    # the whole step adds the per-step term once, whatever the number of micro-batches
    stepped = dataclasses.replace(cost, step_ms=250.0)
    assert predicted_step_s(plan, lengths, stepped) == pytest.approx(plan.predicted_time_s + 0.25, rel=1e-9)
    assert "1024-token sequence" in skip_reason("static-1", [lengths], cost)
    assert skip_reason("static-2", [lengths], cost) is None
    assert skip_reason("flexsp", [lengths], cost) is None


def test_repeat_noise_pairs_only_rows_that_ran_the_same_groups():
    from benchmarks.e2e import repeat_noise

    same, other = [[[0, 1], [0]], [[2, 3], [1]]], [[[0, 1, 2, 3], [0, 1]]]
    info = {"a": [{"groups": same}], "b": [{"groups": same}], "c": [{"groups": other}]}
    rows = [
        {"policy": "a", "step": 0, "step_s": 1.0, "cpu_s_max_rank": 0.5},
        {"policy": "b", "step": 0, "step_s": 1.5, "cpu_s_max_rank": 0.5},
        {"policy": "c", "step": 0, "step_s": 9.0, "cpu_s_max_rank": 9.0},
    ]
    noise = repeat_noise(rows, info)
    assert noise["pairs"] == 1 and noise["cpu_mean_abs_pct"] == 0.0
    assert noise["step_mean_abs_pct"] == pytest.approx(100 * 0.5 / 1.25, rel=1e-12)
    assert repeat_noise(rows[2:], info) == {"pairs": 0, "step_mean_abs_pct": None, "cpu_mean_abs_pct": None}


@pytest.mark.slow
def test_e2e_benchmark_writes_its_results(tmp_path):
    cmd = [sys.executable, "benchmarks/e2e.py", "--world-size", "2", "--steps", "1", "--warmup", "1"]
    cmd += ["--batch-sequences", "4", "--max-seq-len", "128", "--calibration-lengths", "64", "128"]
    cmd += ["--calibration-repeats", "1", "--set", "model.d_model=32", "model.ffn_hidden=32", "moe.router_dim=16"]
    _run([*cmd, "--out-dir", str(tmp_path)], timeout=600)
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert (tmp_path / "e2e.png").stat().st_size > 0 and (tmp_path / "e2e_profile.json").stat().st_size > 0
    assert {"machine", "versions", "config", "cost_models", "policies", "summary", "rows"} <= set(result)
    assert result["machine"]["git_revision"] and result["config"]["world_size"] == 2
    # every policy holds 128-token sequences at W=2 under the tiny-cpu cap: none is skipped
    policies = {"flexsp", "static-1", "static-2", "batch_adaptive"}
    assert {p for p, s in result["policies"].items() if s["status"] == "ran"} == policies
    assert {r["policy"] for r in result["rows"]} == policies and len(result["rows"]) == 2 * len(policies)
    coefficients = result["cost_models"]["calibrated"]
    assert all(math.isfinite(coefficients[k]) and coefficients[k] >= 0 for k in ("quad_ms", "lin_ms", "beta_ms"))
    assert coefficients["step_ms"] >= 0 and coefficients["quad_sp_factor"] > 0  # fitted by the profile
    assert result["cost_models"]["calibration"]["step_points"]  # the engine steps that identify step_ms
    assert result["cost_models"]["calibration"]["fit_points"]
    for policy, s in result["summary"]["per_policy"].items():
        assert policy in policies and s["steps"] == 1
        for key in ("tokens_per_s", "step_s", "fwd_bwd_s", "predicted_s", "predicted_preset_s", "predicted_step_s"):
            assert math.isfinite(s[key]) and s[key] > 0, (policy, key)
        assert s["comm_bytes_per_step_max_rank"] >= 0 and s["solve_time_s"]["median"] >= 0
        for error in s["cost_model_error"].values():
            assert math.isfinite(error["median_pct"]) and math.isfinite(error["mean_abs_pct"])
    assert set(result["summary"]["speedups"]) == {f"flexsp_vs_{p}" for p in policies - {"flexsp"}}
    errors = result["summary"]["cost_model_error"]
    assert {"calibrated_vs_fwd_bwd", "calibrated_vs_step", "preset_vs_fwd_bwd", "preset_vs_step"} | {
        "calibrated_cpu_time_vs_step_cpu"  # calibrated in this run: its CPU-time model prices every plan too
    } | {"bracketed_vs_fwd_bwd", "bracketed_vs_step", "bracketed_cpu_time_vs_step_cpu"} == set(errors)
    assert all(math.isfinite(e["mean_abs_pct"]) for e in errors.values())
    # calibrated again after training: every plan priced by both, the drift between them recorded
    assert result["cost_models"]["calibrated_after"]["lin_ms"] >= 0 and result["cost_models"]["calibration_after"]
    assert all(math.isfinite(v) and v > 0 for v in result["summary"]["calibration_drift"].values())
    for row in result["rows"]:
        assert row["bracketed_step_s"] == pytest.approx((row["predicted_step_s"] + row["after_step_s"]) / 2)
    noise = result["summary"]["repeat_noise"]  # policies that chose the same groups, measured apart
    assert noise["pairs"] == 0 or (noise["step_mean_abs_pct"] >= 0 and noise["cpu_mean_abs_pct"] >= 0)
    assert result["cost_models"]["calibrated_cpu_time"]["step_ms"] >= 0
    # same weights and batch, different plans: the first step's loss agrees (plan invariance)
    assert result["summary"]["step0_loss_max_rel_diff"] <= 1e-5


def test_projection_benchmark_writes_its_results(tmp_path):
    profile = _write_profile(tmp_path / "profile.json")
    cmd = [sys.executable, "benchmarks/projection.py", "--ranks", "8", "16", "--pod-ranks", "8", "--batches", "1"]
    cmd += ["--seqs-per-rank", "2", "--distributions", "wikipedia", "--cpu-profile", str(profile)]
    cmd += ["--cost-models", "flexsp-gpt7b-a100", "hybrid-1b-h100", "tiny-cpu-calibrated"]
    _run([*cmd, "--out-dir", str(tmp_path)], timeout=300)
    result = json.loads((tmp_path / "projection.json").read_text())
    assert (tmp_path / "projection.png").stat().st_size > 0
    assert "PROJECTION" in result["kind"] and "not measurements" in result["kind"]
    assert {"machine", "config", "cost_models", "summary", "rows"} <= set(result)
    models = {"flexsp-gpt7b-a100", "hybrid-1b-h100", "tiny-cpu-calibrated"}
    assert {(r["cost_model"], r["num_ranks"]) for r in result["rows"]} == {(m, n) for m in models for n in (8, 16)}
    for row in result["rows"]:
        # 16 ranks are planned as two pods of 8; the step lasts as long as the slowest pod
        assert row["pods"] == (2 if row["num_ranks"] == 16 else 1) and row["pod_ranks"] == 8
        assert row["batch_sequences"] == 2 * row["num_ranks"] and row["max_len"] <= row["cap"]
        for key in ("flexsp_s", "batch_adaptive_s", "best_static_s", "speedup_vs_best_static",
                    "speedup_vs_batch_adaptive", "plan_wall_s"):  # fmt: skip
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["speedup_vs_best_static"] == pytest.approx(row["best_static_s"] / row["flexsp_s"])
        assert str(row["best_static_degree"]) in row["static_s"]
    assert set(result["summary"]) == models
    assert set(result["summary"]["flexsp-gpt7b-a100"]) == {"8", "16"}


@pytest.mark.slow
def test_soak_quick_records_memory_descriptors_and_groups(tmp_path):
    """`soak.py --quick`: 60 steps on 4 gloo ranks, a sample every 10; the figures are recorded
    and the acceptance computed (its verdict is not asserted: 60 steps are still warm-up)."""
    cmd = [sys.executable, "benchmarks/soak.py", "--quick", "--out-dir", str(tmp_path)]
    _run(cmd, timeout=600)
    result = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").stat().st_size > 0
    summary = result["summary"]
    assert summary["steps"] == 60 and [m["step"] for m in result["metrics"]] == list(range(60))
    assert len(summary["plan_shapes"]) >= 2  # FlexSP plans change from step to step
    for rank in range(4):
        rows = result["samples"][str(rank)]
        assert [s["step"] for s in rows] == [0, 10, 20, 30, 40, 50, 59]
        assert all(s["rss"] > 0 and s["fds"] > 0 for s in rows)
        # DESIGN invariant 6: at most world - 1 cached groups, and none created after start-up
        assert {s["cached_groups"] for s in rows} <= {1, 2, 3} and summary["ranks"][f"rank{rank}"]["groups_ok"]
    assert any(s.get("planner_rss") for s in result["samples"]["0"])  # the planner worker was found
    assert {"rss", "fds", "groups"} <= set(summary["criterion"]) and isinstance(summary["passed"], bool)
    assert summary["checkpoints_left"] == ["step_000040", "step_000060"]
    assert math.isfinite(summary["loss_last"]) and summary["loss_last"] < summary["loss_first"]


def test_gpu_delta_check_smoke_run_on_cpu(tmp_path):
    """The prepared GPU check of the delta rule runs end to end (torch rows only on CPU)."""
    cmd = [sys.executable, "benchmarks/gpu_delta_check.py", "--device", "cpu", "--lengths", "128"]
    cmd += ["--heads", "2", "--head-dim", "8", "--repeats", "1", "--out-dir", str(tmp_path)]
    _run(cmd, timeout=300)
    result = json.loads((tmp_path / "gpu_delta_check.json").read_text())
    assert result["fla_available"] is False
    assert {row["backend"] for row in result["accuracy"]} == {"torch"} and len(result["throughput"]) == 1


def test_soak_verdict_ignores_one_outlying_sample_but_not_a_leak():
    """The RSS verdict is the Theil-Sen slope: one sample taken after the allocator gave pages
    back must not fail a flat run (it made the least-squares slope 2.8 MiB/100 steps in a real
    soak), and a steady leak of 3 MiB per 100 steps must fail (limit 2)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.soak import MIB, summarise

    steps = list(range(0, 1001, 50))

    def samples(rss_of):
        row = {"fds": 40, "cached_groups": 2, "torch_groups": 5, "planner_rss": 230 * MIB}
        return {r: [{**row, "step": s, "rss": rss_of(s)} for s in steps] for r in range(4)}

    flat = samples(lambda s: (486 + (s // 50) % 3) * MIB - (36 * MIB if s == 500 else 0))
    summary = summarise(flat, world=4, max_slope_mib=2.0)
    assert summary["passed"], summary["ranks"]["rank0"]
    assert summary["ranks"]["rank0"]["rss_second_half_slope_mib_per_100_steps"] > 2.0  # least squares alone would fail
    leak = samples(lambda s: int((400 + 0.03 * s) * MIB))
    summary = summarise(leak, world=4, max_slope_mib=2.0)
    assert not summary["passed"]
    assert summary["ranks"]["rank0"]["rss_second_half_theil_sen_mib_per_100_steps"] == pytest.approx(3.0, rel=1e-3)

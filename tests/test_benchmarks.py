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
        "--repeats",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "sp_ops.json").read_text())
    assert (tmp_path / "sp_ops.png").stat().st_size > 0
    assert {"machine", "config", "summary", "rows"} <= set(result)
    assert result["machine"]["git_revision"]
    methods = {(r["kind"], r["method"]) for r in result["rows"]}
    assert methods == {
        ("linear", "LASP-2"),
        ("linear", "LASP-1"),
        ("linear", "Ulysses"),
        ("softmax", "LASP-2H"),
        ("softmax", "Ulysses"),
    }
    lasp2 = next(r for r in result["rows"] if r["method"] == "LASP-2")
    # B=1, H=4, d=64 fp32 state; forward (+8-byte fingerprint) and backward, one peer
    assert lasp2["bytes_sent_max_rank"] == (4 * 64 * 64 + 2) * 4 + 4 * 64 * 64 * 4
    assert "W=2,T=256" in result["summary"]["lasp1_over_lasp2_time"]


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
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "linear_kernels.json").read_text())
    assert result["config"]["device"] in ("cpu", "cuda") and result["rows"]
    assert (tmp_path / "linear_kernels.png").stat().st_size > 0


def test_planner_benchmark_writes_its_results(tmp_path):
    cmd = [sys.executable, "benchmarks/planner.py", "--quick", "--batches", "1", "--batch-size", "128"]
    subprocess.run(
        [*cmd, "--out-dir", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300
    )
    result = json.loads((tmp_path / "planner.json").read_text())
    assert (tmp_path / "planner.png").stat().st_size > 0
    assert {"machine", "config", "summary", "rows"} <= set(result)
    assert result["config"]["num_ranks"] == 64 and result["config"]["batch_size"] == 128
    # every cost model x distribution, one batch each
    cases = {(r["cost_model"], r["distribution"]) for r in result["rows"]}
    assert cases == {
        (c, d) for c in ("flexsp-gpt7b-a100", "hybrid-1b-h100") for d in ("wikipedia", "github", "commoncrawl")
    }
    for row in result["rows"]:
        assert row["speedup_vs_static"] == pytest.approx(row["static_time_s"] / row["predicted_time_s"])
        assert row["speedup_vs_batch_adaptive"] > 0 and row["plan_wall_s"] > 0 and row["gap_to_lower_bound"] >= -1e-9
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
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
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

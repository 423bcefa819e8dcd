"""The GPU check's --dry mode runs top to bottom on the CPU (gloo) and writes every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_stage_on_cpu(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry", "--steps", "2", "--worlds", "2"]
    cmd += ["--out-dir", str(tmp_path), "--set", "data.global_batch_sequences=4"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"train_bf16", "multiprocess", "syncs_memory", "telemetry_budget"}
    failed = {name: s.get("error") for name, s in stages.items() if not s["ok"]}
    assert done.returncode == 0 and not failed, (failed, done.stderr[-3000:])
    assert report["dry"] and all(s["skipped"] for s in stages.values())  # CUDA-only parts are named
    assert len(stages["train_bf16"]["rows"]) == 2 and not stages["train_bf16"]["loss_trend_checked"]
    world2 = stages["multiprocess"]["worlds"]["2"]
    assert world2["max_grad_rel_err"] <= stages["multiprocess"]["tolerance"]
    assert all(n >= 0 for n in stages["syncs_memory"]["host_reads_per_step"])
    assert stages["telemetry_budget"]["rows"] == 2 and stages["telemetry_budget"]["auto_cost_model"] != "hybrid-1b-h100"

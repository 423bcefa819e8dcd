"""The learning rate each step trains at: linear warmup from lr/warmup at step 0, then cosine to
min_lr, read from the optimizer's parameter groups at the moment each step's update runs, and
the same rate in that step's metrics.jsonl row (exact: both are the same float)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import load_config
from runtime.lr_schedule import lr_at
from tests.test_bad_inputs import REPO, TINY, _env


def reference(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Written out by hand: warmup lr*1/W, lr*2/W, ..., lr at step W-1; cosine from lr at step W."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_schedule_function_matches_the_reference(warmup):
    kw = {"lr": 3e-3, "min_lr": 3e-4, "warmup": warmup, "total": 20}
    rates = [lr_at(s, **kw) for s in range(20)]
    assert rates == pytest.approx([reference(s, **kw) for s in range(20)], rel=1e-12, abs=0)
    assert rates[0] > 0  # step 0 learns
    assert max(rates) == pytest.approx(3e-3, rel=1e-12)


def record_rates(args: list[str], out: str) -> None:
    """Train ``args`` in this process; write the lr of every parameter group at each optimizer
    step to ``out`` (JSON). One training per process: DeepSpeed caches its process groups."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from runtime.train import train

    used: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, a, k: used.append([g["lr"] for g in optimizer.param_groups])
    )
    try:
        train(load_config(TINY[0], args), report=lambda line: None)
    finally:
        hook.remove()
    Path(out).write_text(json.dumps(used))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_optimizer_uses_and_metrics_log_each_steps_rate(zero_stage, tmp_path):
    """20 steps: the lr in every parameter group when optimizer.step() runs is the reference
    rate of that step, and metrics.jsonl logs that same rate for that step."""
    steps, warmup = 20, 5
    args = [
        *TINY[1:],
        f"--train.steps={steps}",
        f"--train.warmup_steps={warmup}",
        "--train.checkpoint_every=0",
        f"--train.zero_stage={zero_stage}",
        "--data.global_batch_sequences=2",
        "--data.max_seq_len=64",
        f"--train.run_dir={tmp_path / 'run'}",
    ]
    out = tmp_path / "rates.json"
    code = f"from tests.test_lr_schedule import record_rates; record_rates({args!r}, {str(out)!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads(out.read_text())
    t = load_config(TINY[0], args).train
    expected = [reference(s, lr=t.lr, min_lr=t.min_lr, warmup=warmup, total=steps) for s in range(steps)]
    # ZeRO-1 steps the base optimizer once per parameter group it flattened (3 calls a step here)
    calls = len(used) // steps
    assert calls >= 1 and len(used) == calls * steps, len(used)
    for i, rates in enumerate(used):
        assert rates == pytest.approx([expected[i // calls]] * len(rates), rel=1e-12, abs=0), i
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12, abs=0)
    assert rows[0]["lr"] == pytest.approx(t.lr / warmup, rel=1e-12)

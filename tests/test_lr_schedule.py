"""The learning rate each step trains at: linear warmup from lr/warmup at step 0, then cosine to
min_lr, read from the optimizer's parameter groups at the moment each step's update runs, and
the same rate in that step's metrics.jsonl row (exact: both are the same float)."""

from __future__ import annotations

import json
import math

import pytest

from runtime.config import load_config
from runtime.lr_schedule import lr_at
from tests.test_bad_inputs import TINY


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


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_optimizer_uses_and_metrics_log_each_steps_rate(zero_stage, tmp_path, monkeypatch):
    """20 steps in this process: the lr in every parameter group when optimizer.step() runs is the
    reference rate of that step, and metrics.jsonl logs that same rate for that step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from runtime.train import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    steps, warmup = 20, 5
    config = load_config(
        TINY[0],
        [
            *TINY[1:],
            f"--train.steps={steps}",
            f"--train.warmup_steps={warmup}",
            "--train.checkpoint_every=0",
            f"--train.zero_stage={zero_stage}",
            "--data.global_batch_sequences=2",
            "--data.max_seq_len=64",
            f"--train.run_dir={tmp_path}",
        ],
    )
    used: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append([g["lr"] for g in optimizer.param_groups])
    )
    try:
        train(config, report=lambda line: None)
    finally:
        hook.remove()
    t = config.train
    expected = [reference(s, lr=t.lr, min_lr=t.min_lr, warmup=warmup, total=steps) for s in range(steps)]
    assert len(used) == steps
    for step, rates in enumerate(used):
        assert rates == pytest.approx([expected[step]] * len(rates), rel=1e-12, abs=0), step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12, abs=0)
    assert rows[0]["lr"] == pytest.approx(t.lr / warmup, rel=1e-12)

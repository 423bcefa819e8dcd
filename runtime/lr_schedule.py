"""The learning-rate schedule: linear warmup, then cosine decay to ``train.min_lr``.

``lr_at(step)`` is the rate that step ``step`` (0-based) trains at, so step 0 already learns:
with ``warmup`` steps the warmup rates are lr·1/warmup, lr·2/warmup, ..., lr·warmup/warmup,
and the cosine starts from the full rate at step ``warmup`` and approaches ``min_lr`` at the
last step. The trainer sets it on every parameter group before each step and logs that rate
(DeepSpeed's WarmupCosineLR trained step 0 at 0 and reported the next step's rate). The rate is
a function of the step alone, so a resumed run needs no scheduler state to be exact.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "set_lr"]


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The rate of step ``step`` of ``total``: warmup lr·(step+1)/warmup, then cosine lr -> min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = max(total - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, rate: float) -> float:
    """Give every parameter group of ``optimizer`` (torch or DeepSpeed ZeRO) the rate ``rate``."""
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate

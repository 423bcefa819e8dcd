"""Rank 0's progress report: a tqdm bar on a terminal, plain lines in a log.

On a terminal (stdout is a TTY) the bar moves every step and its figures refresh every
``train.log_every`` steps. Anywhere else (Slurm's output file, a pipe, CI) a bar's carriage
returns make the log unreadable, so one plain line is printed every ``train.log_every`` steps,
plus the last step and every evaluation step::

    step 10/50 | loss 5.2134 | lr 2.70e-03 | grad 0.82 | 5120 tok/s | 0.41 s/step | plan 1mb 2×d2
"""

from __future__ import annotations

import sys
from typing import TextIO

from runtime.outputs import plan_shape

__all__ = ["Progress", "progress_line"]


def progress_line(row: dict, steps: int) -> str:
    """One metrics row as a plain log line."""
    parts = [f"step {row['step'] + 1}/{steps}", f"loss {row['loss']:.4f}"]
    if "eval_loss" in row:
        parts.append(f"eval {row['eval_loss']:.4f}")
    parts += [
        f"lr {row['lr']:.2e}",
        f"grad {row['grad_norm']:.3g}",
        f"{row['tokens_per_s']:.0f} tok/s",
        f"{row['step_time_s']:.2f} s/step",
        f"plan {plan_shape(row['plan'])}",
    ]
    if row.get("skipped"):
        parts.append("SKIPPED")
    return " | ".join(parts)


class Progress:
    """``update(row)`` after each step, ``close()`` at the end; silent unless ``enabled`` (rank 0)."""

    def __init__(self, *, start: int, steps: int, log_every: int, enabled: bool, stream: TextIO | None = None):
        self.steps, self.log_every, self.enabled = steps, max(log_every, 1), enabled
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def _due(self, row: dict) -> bool:
        step = row["step"]
        return (step + 1) % self.log_every == 0 or step + 1 == self.steps or "eval_loss" in row

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if self._due(row):
                self.bar.set_postfix_str(
                    f"loss {row['loss']:.3f} | {row['tokens_per_s']:.0f} tok/s | plan {plan_shape(row['plan'])}",
                    refresh=False,
                )
            self.bar.update(1)
        elif self._due(row):
            print(progress_line(row, self.steps), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

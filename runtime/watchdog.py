"""Which rank hung, at which step: the message a collective timeout should have had.

Every collective of a step runs with ``parallel.timeout_s`` (the world group's timeout, also
given to the cached SP groups): a rank that never arrives makes its peers' gloo/NCCL call raise
after that long instead of waiting forever. The error itself only says "timed out", so at each
step start every rank records the step it began in the job's rendezvous store (one small key
per rank, no collective); when a collective fails, :meth:`StepWatchdog.explain` reads the other
ranks' keys and names the ranks that never began this step. The run then stops with that one
line and a non-zero exit, so torchrun (``launch.max_restarts`` >= 1) restarts every rank and the
trainer resumes from its last checkpoint.

DeepSpeed creates its expert-parallel groups itself, with torch's default timeout (30 min): a
hang inside an expert all-to-all is caught only after that long. The planner's per-step
broadcast on the world group comes first in every step, so a rank that stops between steps is
caught after ``parallel.timeout_s``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from parallel.context import ParallelContext
from runtime import faults

__all__ = ["StepHangError", "StepWatchdog"]

PREFIX = "seqmoe/progress"


class StepHangError(RuntimeError):
    """A collective of a step timed out or lost a peer; the message names the rank(s) and the step."""


def _looks_like_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or a plain RuntimeError from gloo (not seqmoe's own subclasses)."""
    text = str(exc).lower()
    return (
        isinstance(exc, dist.DistError)
        or type(exc) is RuntimeError
        and any(word in text for word in ("timed out", "timeout", "connection closed", "connection reset", "gloo"))
    )


class StepWatchdog:
    """The step-start hook of the train loop (module docstring)."""

    def __init__(self, ctx: ParallelContext, timeout_s: float, on_begin=None):
        self.ctx, self.timeout_s, self.step, self.on_begin = ctx, timeout_s, None, on_begin
        self.attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = None
        if ctx.world_size > 1:
            try:
                self.store = dist.PrefixStore(f"{PREFIX}/{self.attempt}", dist.distributed_c10d._get_default_store())
            except (RuntimeError, AttributeError, ValueError):
                self.store = None  # no store to share progress: the message cannot name the rank

    def begin(self, step: int) -> None:
        """Called as step ``step`` starts: the caller's hook, test-only faults (runtime/faults.py),
        then record the step."""
        if self.on_begin is not None:
            self.on_begin(self.ctx, step)
        faults.at_step(self.ctx.rank, step)
        self.step = step
        if self.store is not None:
            self.store.set(str(self.ctx.rank), str(step))

    def progress(self) -> dict[int, int | None]:
        """The step each rank last began (None: it never began one, or the store is gone)."""
        seen: dict[int, int | None] = {}
        for rank in range(self.ctx.world_size):
            try:
                key = str(rank)
                seen[rank] = int(self.store.get(key)) if self.store.check([key]) else None
            except (RuntimeError, ValueError):
                seen[rank] = None
        return seen

    def explain(self, exc: BaseException) -> StepHangError | None:
        """A StepHangError naming the rank(s) and step, if ``exc`` is a failed collective, else None."""
        if self.step is None or self.ctx.world_size == 1 or not _looks_like_collective_failure(exc):
            return None
        where = f"step {self.step}: a collective on rank {self.ctx.rank} failed after at most "
        where += f"parallel.timeout_s={self.timeout_s:g} s ({str(exc).splitlines()[0][:160]})"
        if self.store is None:
            return StepHangError(f"{where}; which rank hung is unknown (no rendezvous store)")
        self.store.set_timeout(timedelta(seconds=5))
        progress = self.progress()
        behind = {r: s for r, s in progress.items() if s is None or s < self.step}
        if not behind:
            return StepHangError(
                f"{where}; every rank began step {self.step}, so one of them hangs inside it (or died); stopping so "
                "the launcher can restart from the last checkpoint"
            )
        named = ", ".join(f"rank {r} (last began step {s})" for r, s in sorted(behind.items()))
        return StepHangError(
            f"{where}; {named} never began step {self.step}: hung or dead; stopping so the launcher can restart "
            "from the last checkpoint"
        )

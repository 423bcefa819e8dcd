"""SIGINT and SIGTERM stop a run after the current step, with a checkpoint (DESIGN invariant 9).

``GracefulStop`` replaces the two handlers while the training loop runs: the first signal only
sets a flag, the loop finishes its step, every rank agrees (one tiny all-reduce per step, so
all ranks stop after the same step even when the signal reached them at different times),
saves a checkpoint and raises ``Interrupted``; ``seqmoe train`` turns that into one line that
says how to resume and exit code ``EXIT_INTERRUPTED``. A second Ctrl-C (SIGINT a second or
more after the first) stops at once. Repeated SIGTERMs never do: under Slurm a worker gets one
from slurmstepd and one forwarded by its torchrun agent, and Slurm sends SIGKILL after its
KillWait anyway.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["EXIT_INTERRUPTED", "GracefulStop", "Interrupted"]

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"; distinct from
# success (0), failure (1), usage errors (2) and a feature that has not landed (3)
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after ``steps_done`` steps, with ``checkpoint`` written."""

    def __init__(self, signum: int, steps_done: int, checkpoint: str):
        self.signum, self.steps_done, self.checkpoint = signum, steps_done, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {steps_done - 1}; checkpoint {checkpoint} written; resume with the same "
            "command plus --train.resume=auto"
        )


class GracefulStop:
    """Context manager: while inside, SIGINT/SIGTERM request a stop instead of killing the process."""

    def __init__(self) -> None:
        self.signum = 0
        self._first_sigint = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint and now - self._first_sigint >= 1.0:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now
            self._first_sigint = self._first_sigint or now
        self.signum = self.signum or signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, ctx) -> int:
        """The signal any rank got (0 = none): every rank calls this after every step."""
        if ctx.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.world)
        return int(flag.item())

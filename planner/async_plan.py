"""Plan step i+1 in the background while step i trains.

    with AsyncPlanner(num_ranks=64, cost=cost) as planner:
        planner.submit(0, lengths_of(0))
        for step in range(steps):
            plan = planner.result(step)            # blocks until this step's plan is ready
            if step + 1 < steps:
                planner.submit(step + 1, lengths_of(step + 1))
            train(step, plan)

Why a process and not a thread: HiGHS (highspy 1.15) keeps the GIL while it solves, and the
planner's packing is pure Python, so a planning thread halves the Python throughput of the
training thread (measured: a busy loop ran at 0.49x of its speed while a thread planned) and
itself runs ~1.5x slower. A one-worker ``spawn`` process pool costs ~1 s once at start-up
(importing PuLP and HiGHS) and then nothing on the training thread. Each plan is exactly
``plan_step(lengths, num_ranks=..., cost=..., **plan_kwargs)`` computed in the worker, so it
equals the synchronous result (whenever no MILP hits its wall-clock limit).

As with any ``spawn`` pool, a script that creates an AsyncPlanner at import time must guard
its entry point with ``if __name__ == "__main__":``; ``executor="thread"`` avoids that.
"""

from __future__ import annotations

import inspect
import multiprocessing
import signal
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from planner.cost import CostModel
from planner.plan import StepPlan
from planner.solver import plan_step

__all__ = ["AsyncPlanner", "PlanningError"]


def _ignore_interrupts() -> None:
    """Pool initializer: a terminal's Ctrl-C reaches the whole process group, the worker included;
    only the trainer acts on it (runtime/signals.py), so the worker must not die with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PlanningError(RuntimeError):
    """Planning one step failed; ``step`` says which, the cause is chained."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(f"planning step {step} failed: {type(cause).__name__}: {cause}")
        self.step = step


def _plan(lengths: list[int], num_ranks: int, cost: CostModel, plan_kwargs: dict[str, Any]) -> StepPlan:
    return plan_step(lengths, num_ranks=num_ranks, cost=cost, **plan_kwargs)


class AsyncPlanner:
    """Background :func:`planner.plan_step` calls keyed by step number (module docstring)."""

    def __init__(self, *, num_ranks: int, cost: CostModel, executor: str = "process", **plan_kwargs: Any):
        allowed = set(inspect.signature(plan_step).parameters) - {"lengths", "num_ranks", "cost"}
        unknown = sorted(set(plan_kwargs) - allowed)
        if unknown:
            raise ValueError(f"AsyncPlanner: unknown plan_step argument(s) {unknown}; allowed: {sorted(allowed)}")
        if executor not in ("process", "thread"):
            raise ValueError(f"executor: got {executor!r}; allowed: 'process', 'thread'")
        self.num_ranks, self.cost, self.plan_kwargs = num_ranks, cost, plan_kwargs
        self._pool: Executor
        if executor == "process":
            # spawn, not fork: the parent may hold torch / NCCL threads that a fork would copy broken.
            # the worker ignores Ctrl-C and SIGTERM: the trainer finishes its step and shuts it down
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_interrupts
            )
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner")
        self._futures: dict[int, Future] = {}

    def submit(self, step: int, lengths: list[int]) -> None:
        """Start planning ``step`` (plans run one at a time, in submission order)."""
        if step in self._futures:
            raise ValueError(f"step {step} was already submitted")
        # A copy: the caller may reuse its list while the worker plans.
        lengths = list(lengths)
        self._futures[step] = self._pool.submit(_plan, lengths, self.num_ranks, self.cost, self.plan_kwargs)

    def result(self, step: int, timeout: float | None = None) -> StepPlan:
        """The plan of ``step``, waiting for it; raises PlanningError if planning failed."""
        if step not in self._futures:
            raise ValueError(f"step {step} was never submitted (pending: {sorted(self._futures)})")
        future = self._futures.pop(step)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            self._futures[step] = future
            raise
        except Exception as exc:
            raise PlanningError(step, exc) from exc

    def pending(self) -> list[int]:
        """Steps submitted and not yet collected."""
        return sorted(self._futures)

    def shutdown(self, wait: bool = True) -> None:
        """Cancel plans not started yet and stop the worker."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._futures.clear()

    def __enter__(self) -> AsyncPlanner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

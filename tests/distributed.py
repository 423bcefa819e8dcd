"""Run a function on W spawned gloo ranks and collect every rank's result.

    results = run_on_ranks(4, fn, x, y=2)   # fn(ctx: ParallelContext, x, y=2) on ranks 0..3

Ranks rendezvous through a file store in a temporary folder (never a fixed port). Workers stay
alive between calls (one pool per world size) because starting W interpreters that import torch
costs seconds; a pool whose call failed or hung is torn down and rebuilt on next use, so a
broken test cannot poison the next one. Results and arguments travel as ``torch.save`` bytes
(no shared-memory file descriptors to leak). ``fn`` must be a module-level function.

A rank that raises makes the call raise ``RankFailure`` with every failing rank's traceback.
A call that does not finish within ``timeout_s`` (a deadlock: ranks waiting on collectives
that others never issue) makes it raise ``TimeoutError`` naming the ranks that never answered.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import queue
import tempfile
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0
# gloo's own collective timeout in the workers: longer than a test needs, shorter than forever,
# so that a rank stuck in a collective eventually errors out even if the parent is gone.
_GLOO_TIMEOUT_S = 300.0


class RankFailure(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, store_path: str, tasks, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # W ranks share 2 cores: one intra-op thread each avoids oversubscription
    torch.set_num_threads(1)
    from parallel.context import ParallelContext

    try:
        ctx = ParallelContext.initialize(
            backend="gloo", device="cpu", init_method=f"file://{store_path}", timeout_s=_GLOO_TIMEOUT_S
        )
        results.put((rank, "ready", b""))
    except BaseException:
        results.put((rank, "error", traceback.format_exc().encode()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            fn, args, kwargs = _loads(task)
            out = fn(ctx, *args, **kwargs)
            results.put((rank, "ok", _dumps(out)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc().encode()))
    ctx.destroy()


class RankPool:
    """W spawned worker processes joined in one gloo world."""

    def __init__(self, world_size: int, *, start_timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world_size = world_size
        self._tmpdir = tempfile.TemporaryDirectory(prefix="seqmoe-ranks-")
        store_path = os.path.join(self._tmpdir.name, "store")
        spawn = mp.get_context("spawn")
        self._results = spawn.Queue()
        self._tasks = [spawn.Queue() for _ in range(world_size)]
        self._procs = [
            spawn.Process(
                target=_worker, args=(rank, world_size, store_path, self._tasks[rank], self._results), daemon=True
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._gather(start_timeout_s, what="start-up")

    def run(self, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
        payload = _dumps((fn, args, kwargs))
        for task_queue in self._tasks:
            task_queue.put(payload)
        return self._gather(timeout_s, what=getattr(fn, "__name__", repr(fn)))

    def _gather(self, timeout_s: float, *, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        outputs: dict[int, tuple[str, bytes]] = {}
        while len(outputs) < self.world_size:
            remaining = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in outputs]
            if remaining <= 0 or dead:
                missing = sorted(set(range(self.world_size)) - set(outputs))
                errors = _format_errors(outputs)
                self.close()
                if dead:
                    raise RankFailure(
                        f"{what}: rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]}){errors}"
                    )
                raise TimeoutError(
                    f"{what}: rank(s) {missing} did not finish within {timeout_s:.0f}s "
                    f"(deadlock: a collective that other ranks never issued?){errors}"
                )
            try:
                rank, status, data = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            outputs[rank] = (status, data)
        if any(status == "error" for status, _ in outputs.values()):
            errors = _format_errors(outputs)
            self.close()
            raise RankFailure(f"{what} failed:{errors}")
        return [_loads(outputs[rank][1]) if outputs[rank][1] else None for rank in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        for proc, task_queue in zip(self._procs, self._tasks):
            if proc.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    task_queue.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._tmpdir.cleanup()


def _format_errors(outputs: dict[int, tuple[str, bytes]]) -> str:
    return "".join(
        f"\n--- rank {rank} ---\n{data.decode()}"
        for rank, (status, data) in sorted(outputs.items())
        if status == "error"
    )


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(world_size: int, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
    """``[fn(ctx_r, *args, **kwargs) for r in ranks]``, run concurrently on ``world_size`` gloo ranks."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout_s=timeout_s, **kwargs)
    except (RankFailure, TimeoutError):
        _POOLS.pop(world_size, None)
        raise


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()

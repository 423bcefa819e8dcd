"""Local multi-rank jobs: spawned processes that rendezvous through a file store."""

from __future__ import annotations

import os
import queue as queue_module
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp


def _rank_main(worker: Callable, rank: int, world: int, store: str, job: object, out_queue) -> None:
    """One rank: ``worker``, then its result flushed, then an exit that skips the interpreter's
    finalisation. Torn down there, gloo's worker threads can still hold work whose tensors need
    the GIL, and the rank dies of SIGABRT ("terminate called without an active exception") after
    a correct run: seen in CI, in e2e.py's rank 0 after its last step. A worker that
    raises keeps its traceback and a non-zero exit code."""
    code = 0
    try:
        worker(rank, world, store, job, out_queue)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    out_queue.close()
    out_queue.join_thread()  # rank 0's result is in the pipe before the process goes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_ranks(
    world: int, worker: Callable, job: object, *, timeout_s: float = 3600.0, what: str = "benchmark"
) -> object:
    """Run ``worker(rank, world, store_path, job, queue)`` on ``world`` spawned processes that
    rendezvous through a file store (never a fixed port); return what rank 0 puts on the queue.
    The result is read before the ranks are joined: rank 0 cannot exit while its result still
    fills the pipe. A rank that dies leaves the others waiting in a collective, so all are
    stopped then; ``what`` names the job in the error."""
    spawn = mp.get_context("spawn")
    out_queue = spawn.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [spawn.Process(target=_rank_main, args=(worker, r, world, store, job, out_queue)) for r in range(world)]
        for p in procs:
            p.start()
        deadline, result = time.monotonic() + timeout_s, None
        while result is None:
            try:
                result = out_queue.get(timeout=5)
            except queue_module.Empty:
                failed = any(p.exitcode not in (None, 0) for p in procs)
                if failed or all(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                    for p in procs:
                        if p.is_alive():
                            p.terminate()
                    break
        for p in procs:
            p.join()
    if result is None or any(p.exitcode for p in procs):
        raise RuntimeError(f"a {what} rank failed: exit codes {[p.exitcode for p in procs]}; see its output")
    return result

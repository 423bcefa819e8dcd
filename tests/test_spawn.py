"""runtime.spawn.spawn_ranks: rank 0's result comes back; a rank that dies, or ranks that all
exit without a result, end in an error naming the job instead of a wait until the deadline."""

from __future__ import annotations

import time

import pytest

from runtime.spawn import spawn_ranks


def _answer(rank, world, store, job, queue):
    if rank == 0:
        queue.put([job] * 100_000)  # larger than a pipe buffer: read before the ranks are joined


def _silent(rank, world, store, job, queue):
    pass


def _dies(rank, world, store, job, queue):
    if rank == 1:
        raise SystemExit(3)
    time.sleep(600)  # rank 0 would wait in a collective for the rank that died


def _raises(rank, world, store, job, queue):
    if rank == 1:
        raise ValueError("bad job")
    time.sleep(600)


def test_rank_zero_result_comes_back():
    assert spawn_ranks(2, _answer, 7) == [7] * 100_000


@pytest.mark.parametrize("worker, codes", [(_silent, "[0, 0]"), (_dies, "[-15, 3]")])
def test_failed_or_silent_ranks_raise_an_error_naming_the_job(worker, codes):
    with pytest.raises(RuntimeError, match=rf"a profiling rank failed: exit codes \{codes}; see its output"):
        spawn_ranks(2, worker, None, timeout_s=300, what="profiling")


def test_a_worker_that_raises_keeps_its_traceback_and_exit_code(capfd):
    with pytest.raises(RuntimeError, match=r"a benchmark rank failed: exit codes \[-15, 1\]"):
        spawn_ranks(2, _raises, None, timeout_s=300)
    assert "ValueError: bad job" in capfd.readouterr().err

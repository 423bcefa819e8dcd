"""Fault tolerance of a real training job (2 torchrun ranks over gloo, small configs). Each fault
ends in a clear message and leaves every checkpoint already written intact:

- a torchrun worker SIGKILLed mid-run: torchrun restarts the ranks (launch.max_restarts=1), the
  trainer resumes from its last valid checkpoint and ends with the losses of an uninterrupted run;
- a rank that hangs at a step start (its peer waits in the step's first collective): the
  collective times out after parallel.timeout_s, the message names the rank and the step, and
  torchrun restarts the job, which resumes from the last checkpoint and finishes;
- a rank that is merely slow (sleeps 2/3 of the timeout): the run goes on and finishes;
- the planner's worker process killed: one warning line, planning goes on in-process;
- a full disk (ENOSPC) while writing a checkpoint: the run stops with one line, the previous
  checkpoints stay valid and no partial folder is left;
- a file of the newest checkpoint truncated while it is read: one line says so and the resume
  falls back to the previous checkpoint (the choice made: fall back, not refuse).

The faults are injected through SEQMOE_FAULT (runtime/faults.py, test-only)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import check_checkpoint
from tests.test_launchers import REPO, SEQMOE, assert_trained, job_env

STEPS = 8
# slower steps than test_launchers' TRAIN_ARGS (~0.5 s a step on 2 CPU cores), so that steps 2..7
# and their checkpoints take seconds after step_000002 appears: the kill lands mid-run
FAULT_ARGS = (
    str(REPO / "configs" / "tiny-cpu.toml"),
    "--launch.nproc_per_node=2",
    "--data.global_batch_sequences=8",
    "--data.max_seq_len=512",
    "--model.d_model=64",
    "--planner.mode=batch_adaptive",  # deterministic plans: the resumed run redoes the same steps
    "--train.eval_every=0",
    f"--train.steps={STEPS}",
    "--train.checkpoint_every=2",
    "--train.keep_checkpoints=8",  # step_000002 is not pruned before the test sees it
)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from every /proc/<p>/stat: works without CONFIG_PROC_CHILDREN)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def torchrun_workers(launch_pid: int) -> dict[int, int]:
    """rank -> pid of the training workers that the torchrun agent under ``seqmoe launch`` started."""
    agents = [p for p in descendants(launch_pid) if "torch.distributed.run" in cmdline(p)]
    workers = {}
    for agent in agents:
        for pid in children(agent):
            env = environ(pid)
            if "RANK" in env:
                workers[int(env["RANK"])] = pid
    return workers


def logged_steps(metrics: Path) -> list[int]:
    """Steps in a metrics.jsonl that rank 0 may be appending to right now (a cut last line is skipped)."""
    steps = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return steps


def wait_for(predicate, timeout_s: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"{what}: the job ended first (exit status {process.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(0.02)


def _launch(run_dir: Path, *extra: str, log: Path, fault: str | None = None) -> subprocess.Popen:
    command = [str(SEQMOE), "launch", *FAULT_ARGS, *extra, f"--train.run_dir={run_dir}"]
    env = job_env() | ({"SEQMOE_FAULT": fault} if fault else {})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        # own session: whatever happens, the test can end the whole job by its process group
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir.parent, start_new_session=True
        )


def _kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the job: the workers first, by pid (torchrun starts them in sessions of their own,
    so they would outlive their agent), then the launch's own process group."""
    for pid in descendants(process.pid)[::-1]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _finish(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_job(process)
        raise


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_exactly(tmp_path):
    # the uninterrupted reference run
    reference_log = tmp_path / "reference.log"
    reference = _launch(tmp_path / "reference", log=reference_log)
    assert _finish(reference, 180) == 0, reference_log.read_text()[-4000:]
    expected = assert_trained(tmp_path / "reference", STEPS)

    run_dir, log = tmp_path / "faulty", tmp_path / "faulty.log"
    job = _launch(run_dir, "--launch.max_restarts=1", log=log)
    try:
        manifest = run_dir / "checkpoints" / "step_000002" / "manifest.json"
        wait_for(manifest.exists, 120, f"{manifest}", job)
        workers = wait_for(lambda: torchrun_workers(job.pid), 10, "the torchrun workers", job)
        assert sorted(workers) == [0, 1], workers
        assert environ(workers[1]).get("TORCHELASTIC_RESTART_COUNT") == "0"
        logged = logged_steps(run_dir / "metrics.jsonl")
        os.kill(workers[1], signal.SIGKILL)
        status = _finish(job, 180)
    finally:
        if job.poll() is None:
            _kill_job(job)
    output = log.read_text(errors="replace")
    assert status == 0, output[-6000:]
    # the kill landed mid-run: steps were left to do, and the restarted ranks resumed to do them
    assert max(logged) < STEPS - 1, logged
    assert "elastic restart #1" in output, output[-6000:]
    assert "resumed from" in output, output[-6000:]
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and f"{run_dir / 'checkpoints'}/step_0000" in resumed[0], resumed
    resumed_step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    assert 2 <= resumed_step < STEPS, resumed
    assert f"done: step {STEPS - 1} loss" in output
    # every step once (the restart dropped the rows of the steps it redid), losses exactly as uninterrupted
    rows = assert_trained(run_dir, STEPS)
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    assert (run_dir / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").is_file()


def _run(run_dir: Path, *extra: str, fault: str | None, timeout_s: float = 900) -> tuple[int, str]:
    """Launch a job with ``fault`` injected, wait for it; (exit status, its whole output)."""
    log = run_dir.with_suffix(".log")
    job = _launch(run_dir, *extra, log=log, fault=fault)
    try:
        status = _finish(job, timeout_s)
    finally:
        if job.poll() is None:
            _kill_job(job)
    return status, log.read_text(errors="replace")


def _assert_checkpoints_valid(run_dir: Path, steps: list[int]) -> None:
    """Exactly these checkpoints exist, each matches its manifest, and no partial folder is left."""
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step_{s:06d}" for s in steps], sorted(root.iterdir())
    for s in steps:
        assert check_checkpoint(root / f"step_{s:06d}", 2) is None, s


@pytest.mark.slow
def test_hung_rank_times_out_names_rank_and_step_and_restarts(tmp_path):
    run_dir = tmp_path / "hang"
    status, output = _run(
        run_dir, "--launch.max_restarts=1", "--parallel.timeout_s=30", fault="hang:rank=1:step=3", timeout_s=1200
    )
    assert status == 0, output[-6000:]
    assert "[fault] rank 1 hangs at step 3" in output
    named = [line for line in output.splitlines() if "never began step 3" in line]
    assert named and all("rank 1 (last began step 2)" in line and "parallel.timeout_s=30" in line for line in named)
    assert "elastic restart #1" in output, output[-6000:]
    assert f"resumed from {run_dir / 'checkpoints'}/step_000002 (step 2)" in output, output[-6000:]
    assert f"done: step {STEPS - 1} loss" in output
    assert_trained(run_dir, STEPS)
    _assert_checkpoints_valid(run_dir, [2, 4, 6, 8])


@pytest.mark.slow
def test_slow_rank_below_the_timeout_finishes(tmp_path):
    run_dir = tmp_path / "slow"
    status, output = _run(run_dir, "--parallel.timeout_s=24", fault="slow:rank=1:step=3:seconds=16")
    assert status == 0, output[-6000:]
    assert "never began" not in output and "elastic restart" not in output
    assert f"done: step {STEPS - 1} loss" in output
    assert_trained(run_dir, STEPS)
    _assert_checkpoints_valid(run_dir, [2, 4, 6, 8])


@pytest.mark.slow
def test_dead_planner_worker_falls_back_to_planning_in_process(tmp_path):
    run_dir = tmp_path / "planner"
    # flexsp with the background planner (FAULT_ARGS plan batch_adaptive, in-process)
    status, output = _run(run_dir, "--planner.mode=flexsp", "--planner.async_plan=true", fault="kill_planner:step=3")
    assert status == 0, output[-6000:]
    assert "[fault] killing the planner worker" in output, output[-6000:]
    warnings = [line for line in output.splitlines() if "planner worker process died" in line]
    # the plan of step 3 may have been ready before the kill: the loss shows at step 3 or 4
    assert len(warnings) == 1 and re.search(r"warning: step [34]: the planner worker process died", warnings[0])
    assert "resource_tracker" not in output  # only the pool worker was killed
    assert f"done: step {STEPS - 1} loss" in output
    assert_trained(run_dir, STEPS)


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    """A job whose disk fills while it writes checkpoint 6: (run folder, exit status, output)."""
    run_dir = tmp_path_factory.mktemp("enospc") / "run"
    status, output = _run(run_dir, fault="enospc:step=6")
    return run_dir, status, output


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_stops_cleanly_and_keeps_the_previous(full_disk_run):
    run_dir, status, output = full_disk_run
    assert status != 0, output[-6000:]
    # (a progress bar may share the line: tqdm moves back with \r, not \n)
    lines = [line[line.index("seqmoe train:") :] for line in output.splitlines() if "seqmoe train:" in line]
    assert lines, output[-6000:]
    for line in lines:  # one line per rank, the same story
        assert "checkpoint step_000006 not written" in line and "No space left on device" in line, line
        assert "step_000004 is intact" in line and "--train.resume=auto" in line, line
    assert "Traceback" not in output.split("checkpoint step_000006 not written")[0][-2000:]
    _assert_checkpoints_valid(run_dir, [2, 4])
    assert [r["step"] for r in assert_trained_prefix(run_dir)] == list(range(6))


def assert_trained_prefix(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_checkpoint_truncated_while_read_falls_back_to_the_previous(full_disk_run, tmp_path):
    source, _, _ = full_disk_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    victim = "step_000004/ds/mp_rank_00_model_states.pt"
    status, output = _run(run_dir, "--train.resume=auto", fault=f"truncate:file={victim}")
    assert status == 0, output[-6000:]
    assert "[fault] truncated" in output
    skipped = [line for line in output.splitlines() if "step_000004 skipped" in line]
    assert len(skipped) == 1, output[-6000:]
    assert "mp_rank_00_model_states.pt does not match its manifest checksum" in skipped[0], skipped
    assert "trying the previous one" in skipped[0]
    assert f"resumed from {run_dir / 'checkpoints'}/step_000002 (step 2)" in output, output[-6000:]
    assert f"done: step {STEPS - 1} loss" in output
    assert_trained(run_dir, STEPS)
    # the resumed run redid steps 2..7 and wrote checkpoint 4 again (over the truncated one)
    _assert_checkpoints_valid(run_dir, [2, 4, 6, 8])


def test_safe_engine_records_a_full_disk_instead_of_raising_mid_save(tmp_path, monkeypatch):
    """DeepSpeed's save must not raise half-way on one rank (its peers would wait in its barriers):
    the first OSError is recorded, the partial file removed, later writes skipped."""
    from runtime import faults
    from runtime.safe_load import SafeCheckpointEngine

    monkeypatch.setenv("SEQMOE_FAULT", "enospc:step=4:rank=1")
    assert faults.checkpoint_write_error(0, 4) is None and faults.checkpoint_write_error(1, 2) is None
    engine = SafeCheckpointEngine(None)
    engine.inject = faults.checkpoint_write_error(1, 4)
    engine.save({"w": torch.zeros(2)}, str(tmp_path / "a.pt"))
    engine.save({"w": torch.zeros(2)}, str(tmp_path / "b.pt"))
    assert "No space left on device" in str(engine.write_error) and not list(tmp_path.iterdir())
    fine = SafeCheckpointEngine(None)
    fine.save({"w": torch.ones(2)}, str(tmp_path / "c.pt"))
    assert fine.write_error is None and torch.load(tmp_path / "c.pt", weights_only=True)["w"].sum() == 2


def test_fault_spec_is_checked_and_fires_only_in_the_first_attempt(monkeypatch):
    from runtime import faults

    with pytest.raises(ValueError, match="SEQMOE_FAULT=.*cannot read 'explode:now'"):
        faults.parse("explode:now")
    monkeypatch.setenv("SEQMOE_FAULT", "enospc:step=4")
    assert faults.checkpoint_write_error(0, 4) is not None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restarted job runs clean
    assert faults.checkpoint_write_error(0, 4) is None

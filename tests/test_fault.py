"""Fault tolerance of a real training job: a torchrun worker is SIGKILLed mid-run; torchrun
restarts the ranks (launch.max_restarts=1), the trainer resumes from its last valid checkpoint,
and the run ends with exactly the metrics and losses of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

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


def _launch(run_dir: Path, *extra: str, log: Path) -> subprocess.Popen:
    command = [str(SEQMOE), "launch", *FAULT_ARGS, *extra, f"--train.run_dir={run_dir}"]
    with log.open("w") as out:
        # own session: whatever happens, the test can end the whole job by its process group
        return subprocess.Popen(
            command, env=job_env(), stdout=out, stderr=subprocess.STDOUT, cwd=run_dir.parent, start_new_session=True
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

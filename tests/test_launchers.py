"""Launchers: rank discovery per source and its errors, the commands each launcher builds,
real 2-rank check jobs under torchrun, mpiexec (the mpich wheel) and a real one-node Slurm, and
real 3-step trainings through `seqmoe launch` under Slurm (both slurm modes) and mpirun.
The torchrun fault test (a worker SIGKILLed, the job restarts and resumes) is in test_fault.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from launchers import DistEnv, LaunchEnvError, LaunchError, check_program, discover_environment
from launchers.env import first_host, slurm_port
from launchers.mpirun import mpirun_command, mpirun_env
from launchers.slurm import sbatch_script
from launchers.torchrun import torchrun_command
from runtime import cli
from runtime.config import ConfigError, load_config

SEQMOE = Path(sys.executable).parent / "seqmoe"
REPO = Path(__file__).resolve().parent.parent
# a small, fast training of the tiny-cpu preset on 2 ranks (~10 s a launch on 2 CPU cores)
TRAIN_ARGS = (
    str(REPO / "configs" / "tiny-cpu.toml"),
    "--launch.nproc_per_node=2",
    "--data.global_batch_sequences=4",
    "--data.max_seq_len=256",
    "--model.d_model=32",
    "--planner.mode=batch_adaptive",
    "--train.eval_every=0",
)
LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_", "MPI_LOCAL", "HYDRA_")
TORCHRUN_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any launcher's variables: a test may itself run inside a job."""
    env = dict(os.environ if base is None else base)
    return {k: v for k, v in env.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in TORCHRUN_NAMES}


def job_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``clean_env`` plus what a training job needs wherever its ranks start (Slurm passes the
    submitter's environment on to the job): DeepSpeed's CPU accelerator and this venv's bin/ first
    on PATH (torch builds DeepSpeed's CPU ops with the venv's ninja)."""
    env = clean_env(base)
    env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trained(run_dir: Path, steps: int) -> list[dict]:
    """metrics.jsonl has each step 0..steps-1 exactly once, in order, with a finite, unskipped loss."""
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps)), [r["step"] for r in rows]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and not row["skipped"], row
    return rows


def slurm_task(**extra: str | None) -> dict[str, str | None]:
    """Rank 3 of 4 on the second of two nodes, as srun sets it."""
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    return env | extra


def torchrun_vars(**values: str) -> dict[str, str]:
    defaults = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    return defaults | values


def fake_mpi4py(monkeypatch, *, rank: int, size: int, local: tuple[int, int] = (0, 1)) -> None:
    """mpi4py stand-in: importing the real one in this process would initialise MPI here."""
    node_comm = types.SimpleNamespace(Get_rank=lambda: local[0], Get_size=lambda: local[1], Free=lambda: None)
    world = types.SimpleNamespace(
        Get_rank=lambda: rank,
        Get_size=lambda: size,
        Split_type=lambda kind: node_comm,
        allreduce=lambda value: size // local[1] if value else 0,
        bcast=lambda value, root: value if rank == root else ("10.0.0.1", 29999),
    )
    mpi = types.SimpleNamespace(COMM_WORLD=world, COMM_TYPE_SHARED=1, Get_library_version=lambda: "FakeMPI 1.0\n")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


# ---- discovery: one case per source ------------------------------------------------------------


def test_torchrun_variables():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
    }
    assert discover_environment(env) == DistEnv(1, 4, 1, 2, "n0", 29500, "torchrun")


def test_torchrun_wins_over_slurm_inside_a_slurm_job():
    env = slurm_task(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="gpu07", MASTER_PORT="23456")
    assert discover_environment(env).source == "torchrun"


def test_slurm_task():
    dist = discover_environment(slurm_task())
    assert dist == DistEnv(3, 4, 1, 2, "gpu07", slurm_port(123456), "slurm")
    assert dist.master_port == 20000 + 123456 % 20000


def test_slurm_honours_master_port_and_ntasks_per_node():
    env = slurm_task(MASTER_PORT="31000", SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="garbage")
    assert discover_environment(env).master_port == 31000


def test_slurm_wins_over_consistent_pmi_from_srun_mpi_pmi2():
    assert discover_environment(slurm_task(PMI_RANK="3", PMI_SIZE="4")).source == "slurm"


def test_mpi_from_mpi4py(monkeypatch):
    fake_mpi4py(monkeypatch, rank=0, size=4, local=(0, 2))
    dist = discover_environment({"PMI_RANK": "0", "PMI_SIZE": "4"})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (0, 4, 0, 2)
    assert dist.source == "mpi" and dist.master_addr and dist.master_port > 0


def test_mpiexec_inside_a_slurm_step_is_mpi(monkeypatch):
    # hydra's proxies are the srun tasks: SLURM_PROCID numbers proxies, PMI_RANK the ranks
    fake_mpi4py(monkeypatch, rank=1, size=4, local=(1, 2))
    dist = discover_environment(slurm_task(SLURM_PROCID="0", SLURM_NTASKS="2", PMI_RANK="1", PMI_SIZE="4"))
    assert (dist.source, dist.rank, dist.master_addr, dist.master_port) == ("mpi", 1, "10.0.0.1", 29999)


def test_single_process_and_export():
    dist = discover_environment({})
    assert (dist.rank, dist.world_size, dist.source) == (0, 1, "single") and dist.master_port > 0
    target: dict[str, str] = {}
    DistEnv(2, 4, 0, 2, "n1", 1234, "slurm").export(target)
    assert target == {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
    }


def test_batch_script_of_a_one_task_job_is_a_single_process():
    assert discover_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}).source == "single"


@pytest.mark.parametrize(
    ("nodelist", "first"), [("localhost", "localhost"), ("gpu[07-09,12],cpu1", "gpu07"), ("a-b[3,1]", "a-b3")]
)
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


# ---- discovery: inconsistent environments name the variable and the fix -----------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"WORLD_SIZE": "2"}, ["RANK", "missing", "seqmoe launch"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["MASTER_ADDR", "MASTER_PORT", "missing"]),
        (
            {"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            ["RANK=4", "WORLD_SIZE=4"],
        ),
        (
            {"RANK": "one", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            ["RANK='one'", "integer"],
        ),
        (slurm_task(SLURM_NTASKS=None), ["SLURM_NTASKS", "srun"]),
        (slurm_task(SLURM_LOCALID="x"), ["SLURM_LOCALID='x'", "integer"]),
        (slurm_task(SLURM_PROCID="4"), ["SLURM_PROCID=4", "SLURM_NTASKS=4"]),
        (slurm_task(SLURM_TASKS_PER_NODE="2(x2", SLURM_NODEID="1"), ["SLURM_TASKS_PER_NODE='2(x2'"]),
        (slurm_task(SLURM_TASKS_PER_NODE="2", SLURM_NODEID="1"), ["SLURM_NODEID=1", "1 node"]),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"}, ["SLURM_NTASKS=2", "SLURM_STEP_ID", "srun"]),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None,
)
def test_inconsistent_environment_is_named(env, names):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(LaunchEnvError) as info:
        discover_environment(env)
    for name in names:
        assert name in str(info.value)


def test_world_size_must_match_the_config():
    with pytest.raises(LaunchEnvError) as info:
        discover_environment(slurm_task(), expected_world_size=8)
    assert "SLURM_NTASKS=4" in str(info.value) and "launch.nproc_per_node" in str(info.value)
    assert discover_environment({}, expected_world_size=8).source == "single"  # not checked for one process


def test_mpi4py_world_disagreeing_with_pmi_in_process(monkeypatch):
    fake_mpi4py(monkeypatch, rank=0, size=1)
    with pytest.raises(LaunchEnvError) as info:
        discover_environment({"PMI_RANK": "0", "PMI_SIZE": "4"})
    assert "PMI_SIZE=4" in str(info.value) and "world of 1" in str(info.value) and ".[mpich]" in str(info.value)


def test_mpi4py_world_disagreeing_with_pmi_for_real(tmp_path):
    # PMI variables without mpiexec: the real mpi4py initialises a singleton world of 1
    env = clean_env() | {"PMI_RANK": "0", "PMI_SIZE": "4"}
    command = [sys.executable, "-m", "launchers.check", "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "PMI_SIZE=4" in result.stderr and "world of 1" in result.stderr


# ---- the commands each launcher builds ---------------------------------------------------------


def test_torchrun_command_has_free_port_rendezvous_and_restarts():
    settings = load_config(None, ["--launch.nproc_per_node=3", "--launch.max_restarts=2"]).launch
    command = torchrun_command(settings, ["-m", "runtime.cli", "train"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for arg in (
        "--nproc-per-node=3",
        "--max-restarts=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
    ):
        assert arg in command
    assert command[-3:] == ["-m", "runtime.cli", "train"]
    with pytest.raises(LaunchError, match="launcher=slurm"):
        torchrun_command(load_config(None, ["--launch.nnodes=2"]).launch, ["-m", "x"])


def test_mpirun_without_mpiexec_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match=r"pip install -e \.\[mpich\]"):
        mpirun_command(load_config().launch, ["-m", "x"])


def test_mpirun_ranks_get_one_openmp_thread_unless_set():
    settings = load_config(None, ["--launch.launcher=mpirun"]).launch
    assert mpirun_env(settings, {}) == {"OMP_NUM_THREADS": "1"}  # as torchrun does: no oversubscription
    assert mpirun_env(settings, {"OMP_NUM_THREADS": "4"}) == {}
    assert mpirun_env(load_config(None, ["--launch.nproc_per_node=1"]).launch, {}) == {}


def test_restarts_need_torchrun():
    with pytest.raises(ConfigError, match="launch.max_restarts"):
        load_config(None, ["--launch.launcher=slurm", "--launch.slurm_mode=srun", "--launch.max_restarts=1"])


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_sbatch_script(mode, tmp_path):
    overrides = [f"--train.run_dir={tmp_path}", f"--launch.slurm_mode={mode}", "--launch.slurm_partition=gpu"]
    config = load_config("configs/tiny-cpu.toml", [*overrides, "--launch.nnodes=2"])
    script = sbatch_script(config, check_program(tmp_path / "check", 8))
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=gpu", f"#SBATCH --output={tmp_path}/slurm-%j.out"):
        assert line in script
    assert f"#SBATCH --ntasks-per-node={1 if mode == 'torchrun' else 4}" in script
    assert ("--rdzv-endpoint=" in script) == (mode == "torchrun")
    # torchrun's restarts need a fresh rendezvous store per attempt (launchers/torchrun.py)
    assert ("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script) == (mode == "torchrun")
    # srun's ranks get one OpenMP thread per CPU of their task, as torchrun gives its workers
    assert ('export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"' in script) == (mode == "srun")
    assert "launchers.check" in script and "--expected-world-size 8" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_launch_cli_dry_run_and_config_argument(tmp_path, capsys):
    argv = ["launch", "configs/tiny-cpu.toml", "--check", "--dry-run", f"--train.run_dir={tmp_path}"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "--nproc-per-node=4" in err  # from the positional config
    assert "seqmoe launch: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in err  # the environment torchrun runs with
    assert cli.main([*argv, "--launch.launcher=slurm"]) == 0
    assert "sbatch" in capsys.readouterr().out and (tmp_path / "check.sbatch").is_file()
    assert cli.main([*argv, "--config", "configs/tiny-cpu.toml"]) == 2
    assert "config twice" in capsys.readouterr().err


# ---- real 2-rank check jobs --------------------------------------------------------------------


def read_ranks(out_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1], records
    for record in records:
        assert record["world_size"] == 2 and record["all_reduce_sum"] == 1 and record["ok"]
    return records


def test_torchrun_restarts_a_failed_worker(tmp_path):
    # rank 1 fails on the first attempt; --max-restarts=1 reruns both ranks on the same free-port rendezvous
    (tmp_path / "flaky.py").write_text(
        "import os, sys\n"
        "attempt = os.environ['TORCHELASTIC_RESTART_COUNT']\n"
        # one write of the whole line: unbuffered print writes each argument apart, and the two
        # ranks share one pipe (a run printed "attemptattempt 0 rank 0")
        "os.write(1, f\"attempt {attempt} rank {os.environ['RANK']}\\n\".encode())\n"
        "sys.exit(1 if attempt == '0' and os.environ['RANK'] == '1' else 0)\n"
    )
    settings = load_config(None, ["--launch.max_restarts=1"]).launch
    env = clean_env() | {"PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        torchrun_command(settings, ["-m", "flaky"]), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # (rank 0 of the first attempt may be stopped before it prints: torchrun tears the group down)
    lines = set(result.stdout.splitlines())
    assert {"attempt 0 rank 1", "attempt 1 rank 0", "attempt 1 rank 1"} <= lines, result.stdout


@pytest.mark.slow
def test_torchrun_launch_check(tmp_path):
    command = [str(SEQMOE), "launch", "--check", "--launch.nproc_per_node=2", f"--train.run_dir={tmp_path}"]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seqmoe check OK: 2 ranks" in result.stdout
    records = read_ranks(tmp_path / "check")
    assert {r["source"] for r in records} == {"torchrun"} and [r["local_rank"] for r in records] == [0, 1]


def test_mpiexec_check(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.is_file():
        pytest.skip("no mpiexec next to this Python; install the mpich wheel: pip install -e .[mpich]")
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "launchers.check", "--out", str(tmp_path)]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_ranks(tmp_path)
    assert {r["source"] for r in records} == {"mpi"} and [r["local_rank"] for r in records] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "source"), [("srun", "slurm"), ("torchrun", "torchrun")])
def test_slurm_launch_check(slurm, mode, source, tmp_path):
    command = [
        str(SEQMOE),
        "launch",
        "--check",
        "--wait",
        "--launch.launcher=slurm",
        "--launch.submit=true",
        f"--launch.slurm_mode={mode}",
        "--launch.slurm_time=00:05:00",
        f"--train.run_dir={tmp_path}",
    ]
    result = subprocess.run(
        command,
        env=clean_env(slurm.env) | {"SLURM_CONF": slurm.env["SLURM_CONF"]},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    outputs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert result.returncode == 0, result.stdout + result.stderr + outputs
    assert "seqmoe check OK: 2 ranks" in outputs
    records = read_ranks(tmp_path / "check")
    assert {r["source"] for r in records} == {source}


# ---- real 2-rank trainings through `seqmoe launch` ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_slurm_launch_trains(slurm, mode, tmp_path):
    """sbatch --wait of a 3-step training: the job's exit status, metrics.jsonl, and the job's output."""
    command = [
        str(SEQMOE),
        "launch",
        *TRAIN_ARGS,
        "--wait",
        "--launch.launcher=slurm",
        "--launch.submit=true",
        f"--launch.slurm_mode={mode}",
        "--launch.slurm_time=00:05:00",
        "--train.steps=3",
        f"--train.run_dir={tmp_path}",
    ]
    env = job_env(slurm.env) | {"SLURM_CONF": slurm.env["SLURM_CONF"]}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    outputs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out")}
    report = result.stdout + result.stderr + "".join(f"\n--- {k}\n{v[-4000:]}" for k, v in outputs.items())
    assert result.returncode == 0, report  # sbatch --wait: the job's own exit status
    assert "finished; output:" in result.stdout, report
    assert len(outputs) == 1, report
    (output,) = outputs.values()
    assert "done: step 2 loss" in output, report  # rank 0 of the training printed its summary
    if mode == "torchrun":
        assert "torch.distributed.run" in (tmp_path / "launch.sbatch").read_text()
    rows = assert_trained(tmp_path, 3)
    assert (tmp_path / "checkpoints" / "step_000003" / "manifest.json").is_file()
    assert f"{rows[-1]['loss']:.4f}" in output


@pytest.mark.slow
def test_mpirun_launch_trains(tmp_path):
    if not (Path(sys.executable).parent / "mpiexec").is_file():
        pytest.skip("no mpiexec next to this Python; install the mpich wheel: pip install -e .[mpich]")
    command = [
        str(SEQMOE),
        "launch",
        *TRAIN_ARGS,
        "--launch.launcher=mpirun",
        "--train.steps=3",
        f"--train.run_dir={tmp_path}",
    ]
    result = subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    assert "mpiexec -n 2 " in result.stderr, report  # the launch line seqmoe printed
    assert "done: step 2 loss" in result.stdout, report
    rows = assert_trained(tmp_path, 3)
    assert f"{rows[-1]['loss']:.4f}" in result.stdout

"""``seqmoe launch``: start one program on every rank with the configured launcher.

A *program* is the argv that follows ``python`` on each rank, e.g. ``["-m", "runtime.cli",
"train", "--config", PATH, "--train.steps=20"]``. Every launcher accepts that shape (torchrun
as ``-m MODULE ARGS``, srun and mpiexec after the interpreter), so training and the
diagnostic check (``python -m launchers.check``) go through the same code.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from launchers.config import LaunchJob

__all__ = ["LaunchError", "check_program", "launch", "run_command", "train_program"]


class LaunchError(RuntimeError):
    """A launch cannot start (missing tool, unsupported setting); the message says the fix."""


def train_program(config_path: str | Path | None, overrides: Sequence[str]) -> list[str]:
    """``seqmoe train`` with the same config and overrides on every rank.

    The config path is made absolute because ranks may start in another directory (Slurm
    nodes, mpiexec hosts); the overrides travel verbatim so every rank resolves the same config.
    """
    argv = ["-m", "runtime.cli", "train"]
    if config_path is not None:
        argv += ["--config", str(Path(config_path).resolve())]
    return argv + list(overrides)


def check_program(out_dir: str | Path, expected_world_size: int) -> list[str]:
    """The diagnostic job: discovery, a gloo all_reduce, one JSON file per rank in ``out_dir``."""
    return [
        "-m",
        "launchers.check",
        "--out",
        str(Path(out_dir).resolve()),
        "--expected-world-size",
        str(expected_world_size),
    ]


def launch(
    config: LaunchJob,
    program: Sequence[str],
    *,
    script_name: str = "launch.sbatch",
    wait: bool = False,
    dry_run: bool = False,
    verbose: bool = True,
) -> int:
    """Run ``program`` on ``launch.nnodes × launch.nproc_per_node`` ranks; the exit status of the job.

    torchrun and mpirun run here and block until the job ends. Slurm writes
    ``<run dir>/<script_name>`` and submits it only with ``launch.submit = true`` (then
    ``wait`` blocks until the job ends, as ``sbatch --wait``). ``dry_run`` prints what would
    run (and writes the sbatch script) without starting anything. ``verbose=False`` runs torchrun
    through launchers/quiet.py (no log lines, no ChildFailedError traceback).
    """
    from launchers import mpirun, slurm, torchrun

    settings = config.launch
    if settings.launcher == "slurm":
        return slurm.launch_slurm(config, program, script_name=script_name, wait=wait, dry_run=dry_run)
    if wait:
        print(f"seqmoe launch: --wait applies to Slurm; {settings.launcher} always waits for the job", file=sys.stderr)
    extra_env: dict[str, str] = {}
    if settings.launcher == "torchrun":
        command = torchrun.torchrun_command(settings, program)
        extra_env = torchrun.TORCHRUN_ENV
        if not verbose:
            command = [command[0], "-m", "launchers.quiet", *command[2:]]
    else:
        command = mpirun.mpirun_command(settings, program)
        extra_env = mpirun.mpirun_env(settings)
    assignments = [f"{name}={value}" for name, value in extra_env.items()]
    if verbose or dry_run or settings.launcher != "torchrun":  # quiet applies to torchrun
        print(f"seqmoe launch: {shlex.join(assignments + command)}", file=sys.stderr, flush=True)
    return 0 if dry_run else run_command(command, env=os.environ | extra_env if extra_env else None)


def run_command(command: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Run a launcher in the foreground; Ctrl-C reaches it too (same process group), we wait for it."""
    process = subprocess.Popen(list(command), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # the launcher got the same SIGINT and is tearing its workers down; don't orphan them
        process.wait()
        return 130

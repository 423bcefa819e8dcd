"""Slurm: write an sbatch script into the run folder, and submit it when asked.

Two ways to start the ranks inside the allocation (``launch.slurm_mode``):

- ``torchrun`` (default): srun starts one torchrun per node; the torchruns meet at a c10d
  rendezvous on the first node of the job, on a port derived from the job id. Elastic restarts
  (``launch.max_restarts``) work as with a local torchrun.
- ``srun``: srun starts one task per rank directly; each task reads its rank from Slurm's
  variables (launchers/env.py derives the same first node and port). No restarts.

The script is written even when it is not submitted, so it can be read, edited (GPU requests
such as ``--gpus-per-node`` depend on the cluster) and submitted by hand.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from launchers.config import LaunchJob
from launchers.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from launchers.launch import LaunchError
from launchers.torchrun import TORCHRUN_ENV

__all__ = ["launch_slurm", "sbatch_script", "submit", "write_sbatch"]


def sbatch_script(config: LaunchJob, program: Sequence[str], *, workdir: str | Path | None = None) -> str:
    """The sbatch script that runs ``program`` (argv after ``python``) on every rank of the job."""
    settings = config.launch
    run_dir = config.resolved_run_dir.resolve()
    python = shlex.quote(sys.executable)
    per_node = settings.nproc_per_node
    tasks_per_node, cpus_per_task = (1, per_node) if settings.slurm_mode == "torchrun" else (per_node, 1)
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name=seqmoe-{config.name}",
        f"#SBATCH --nodes={settings.nnodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        *([f"#SBATCH --partition={settings.slurm_partition}"] if settings.slurm_partition else []),
        f"#SBATCH --time={settings.slurm_time}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        f"#SBATCH --chdir={Path(workdir or Path.cwd()).resolve()}",
        f"# Written by `seqmoe launch` (launch.slurm_mode = {settings.slurm_mode!r}).",
        "# GPU nodes: add the cluster's GPU request here, e.g. #SBATCH --gpus-per-node=8",
        "set -eu",
        "",
    ]
    args = " ".join(shlex.quote(a) for a in program)
    if settings.slurm_mode == "srun":
        body = [
            "# one task per rank; each derives its rank, the first node and the job's port from Slurm's variables",
            "# one OpenMP thread per CPU of the task (torchrun does the same for its workers); unset, every rank",
            "# starts a thread per core of the node where tasks are not bound to their CPUs, and they oversubscribe it",
            'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
            f"srun --ntasks-per-node={per_node} --kill-on-bad-exit=1 {python} {args}",
        ]
    else:
        body = [
            "# one torchrun per node; they meet at a c10d rendezvous on the first node, on a port derived from",
            "# the job id (the same formula as launchers/env.py), so concurrent jobs do not collide",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            f"port=$(({SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN}))",
            "# a fresh rendezvous store for every restart's workers (see launchers/torchrun.py)",
            *(f"export {name}={shlex.quote(value)}" for name, value in TORCHRUN_ENV.items()),
            f"srun --ntasks-per-node=1 --cpus-per-task={per_node} --kill-on-bad-exit=1 \\",
            f"    {python} -m torch.distributed.run --nnodes={settings.nnodes} --nproc-per-node={per_node} \\",
            f'    --max-restarts={settings.max_restarts} --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d \\',
            '    --rdzv-endpoint="$head_node:$port" \\',
            f"    {args}",
        ]
    return "\n".join(header + body) + "\n"


def write_sbatch(config: LaunchJob, program: Sequence[str], path: str | Path) -> Path:
    """Write the script (and the run folder, where Slurm puts the job's output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config.resolved_run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(sbatch_script(config, program))
    path.chmod(0o755)
    return path


def submit(script: str | Path, *, wait: bool = False) -> tuple[int, str]:
    """``sbatch`` the script: (exit status, job id). With ``wait`` the status is the job's own."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "launch.submit=true but `sbatch` is not on PATH; run `seqmoe launch` on a Slurm login node, or set "
            f"--launch.submit=false and submit {script} there yourself"
        )
    command = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    # --parsable prints "jobid" or "jobid;cluster"; sbatch's own errors went to stderr already
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    return result.returncode, job_id


def launch_slurm(
    config: LaunchJob, program: Sequence[str], *, script_name: str, wait: bool = False, dry_run: bool = False
) -> int:
    """Write ``<run dir>/<script_name>``; submit it if ``launch.submit`` (and not ``dry_run``)."""
    script = write_sbatch(config, program, config.resolved_run_dir / script_name)
    if dry_run or not config.launch.submit:
        print(f"seqmoe launch: wrote {script}; submit it with: sbatch {shlex.quote(str(script))}")
        if wait:
            print(
                "seqmoe launch: --wait applies only when the job is submitted (--launch.submit=true)", file=sys.stderr
            )
        return 0
    if wait:
        print(f"seqmoe launch: submitting {script} and waiting for the job (sbatch --wait)", flush=True)
    status, job_id = submit(script, wait=wait)
    output = config.resolved_run_dir.resolve() / f"slurm-{job_id}.out"
    if not job_id:
        print(f"seqmoe launch: sbatch {script} failed with exit status {status}", file=sys.stderr)
        return status or 1
    if not wait:
        print(f"seqmoe launch: submitted Slurm job {job_id}; output: {output}")
    elif status == 0:
        print(f"seqmoe launch: Slurm job {job_id} finished; output: {output}")
    else:
        print(f"seqmoe launch: Slurm job {job_id} failed with exit status {status}; see {output}", file=sys.stderr)
    return status

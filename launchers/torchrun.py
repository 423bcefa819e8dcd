"""Local multi-process launch with torchrun (``python -m torch.distributed.run``).

The rendezvous is c10d on ``127.0.0.1:0`` (loopback only: a single-node job listens on no
network interface; ``--local-addr`` makes the workers' MASTER_ADDR loopback too). torchrun binds
a free port itself, so two jobs on one machine never collide and nothing needs a fixed port.
``launch.max_restarts`` maps to ``--max-restarts``: when a worker fails, torchrun restarts all
of them and the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from launchers.config import LaunchConfig
from launchers.launch import LaunchError

__all__ = ["TORCHRUN_ENV", "torchrun_command"]

# Environment for every torchrun agent that seqmoe starts (locally and in the sbatch script).
# By default the c10d rendezvous shares the agent's TCPStore with the workers, and every restart's
# workers use the same keys in it: the restarted ranks read the dead ranks' gloo addresses and hang
# in their first new_group (pytorch/pytorch#135712). Opting out gives each attempt a fresh store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(settings: LaunchConfig, program: Sequence[str], *, python: str | None = None) -> list[str]:
    """The torchrun command line that runs ``program`` (``-m MODULE ARGS``) on this machine's ranks."""
    if settings.nnodes != 1:
        raise LaunchError(
            f"launch.nnodes={settings.nnodes} with launch.launcher='torchrun': this launcher starts processes on "
            "this machine only; use --launch.launcher=slurm (one torchrun per node, started by srun), or "
            "--launch.launcher=mpirun with a host file, or run torchrun on every node yourself"
        )
    if list(program[:1]) != ["-m"]:
        raise ValueError(f"program must start with -m MODULE, got {list(program)!r}")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={settings.nproc_per_node}",
        "--nnodes=1",
        f"--max-restarts={settings.max_restarts}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",  # one node: the workers' MASTER_ADDR is loopback, not the host name
        *program,
    ]

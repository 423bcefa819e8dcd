"""Launch with ``mpiexec``; each rank finds itself through mpi4py (launchers/env.py).

The mpiexec next to this Python comes first: the ``mpich`` wheel (``pip install -e .[mpich]``)
installs one there, and it is the MPI that mpi4py talks to. A system mpirun of another MPI
(Open MPI with an MPICH-built mpi4py, say) starts processes that each believe they are rank 0
of 1; discovery reports that mismatch rather than letting the job hang.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from launchers.config import LaunchConfig
from launchers.launch import LaunchError

__all__ = ["find_mpiexec", "mpirun_command", "mpirun_env"]


def find_mpiexec() -> str:
    """The mpiexec next to sys.executable (the venv's), else the first one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise LaunchError(
            "launch.launcher='mpirun' but no mpiexec was found next to this Python or on PATH; install the MPICH "
            "wheel into this environment with `pip install -e .[mpich]` (or load your cluster's MPI module)"
        )
    return found


def mpirun_command(
    settings: LaunchConfig, program: Sequence[str], *, mpiexec: str | None = None, python: str | None = None
) -> list[str]:
    """``mpiexec -n WORLD python PROGRAM``; with several nodes the hosts come from the MPI's host
    file or the surrounding Slurm allocation, as usual for that MPI."""
    world_size = settings.nnodes * settings.nproc_per_node
    return [mpiexec or find_mpiexec(), "-n", str(world_size), python or sys.executable, *program]


def mpirun_env(settings: LaunchConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables to add for mpiexec's ranks: one OpenMP thread each unless OMP_NUM_THREADS is set, as
    torchrun does; otherwise every rank starts a thread per core and the ranks oversubscribe the machine."""
    environ = os.environ if environ is None else environ
    if settings.nproc_per_node > 1 and "OMP_NUM_THREADS" not in environ:
        return {"OMP_NUM_THREADS": "1"}
    return {}

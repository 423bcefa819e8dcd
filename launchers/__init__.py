"""Start seqmoe on many processes: torchrun, Slurm (sbatch + srun) and mpirun (mpi4py rank discovery).

- ``discover_environment()`` / ``DistEnv``: which rank this process is, under any launcher
  (launchers/env.py); the trainer calls it first thing.
- ``launch(config, program)``: run a program on every rank with ``config.launch``'s launcher;
  ``train_program`` (``seqmoe train``) and ``check_program`` (``python -m launchers.check``)
  build the programs. ``seqmoe launch [--check]`` is the command-line face of this.

Importing this package does not import torch or mpi4py.
"""

from launchers.env import DistEnv, LaunchEnvError, discover_environment
from launchers.launch import LaunchError, check_program, launch, train_program

__all__ = [
    "DistEnv",
    "LaunchEnvError",
    "LaunchError",
    "check_program",
    "discover_environment",
    "launch",
    "train_program",
]

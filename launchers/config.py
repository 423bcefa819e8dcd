"""The ``[launch]`` config section, and what a launcher needs to know about a run.

Launchers read only this module (no runtime/ import): ``LaunchJob`` is the part of the
composed run config they use, which ``runtime.config.Config`` provides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from parallel.configbase import fail, positive

__all__ = ["LaunchConfig", "LaunchJob"]


@dataclass(kw_only=True)
class LaunchConfig:
    launcher: Literal["torchrun", "slurm", "mpirun"] = "torchrun"
    nproc_per_node: int = 2
    nnodes: int = 1
    max_restarts: int = 0
    """torchrun elastic restarts; each restart resumes from the last checkpoint."""
    slurm_partition: str = ""
    slurm_time: str = "00:30:00"
    submit: bool = False
    """slurm: submit the written sbatch script with sbatch."""
    slurm_mode: Literal["torchrun", "srun"] = "torchrun"
    """slurm: srun starts one torchrun per node (elastic restarts work), or one task per rank (srun)."""

    def validate(self) -> None:
        positive("launch.nproc_per_node", self.nproc_per_node)
        positive("launch.nnodes", self.nnodes)
        if self.max_restarts < 0:
            fail("launch.max_restarts", self.max_restarts, "must be >= 0")
        if self.max_restarts and (self.launcher == "mpirun" or self.launcher == "slurm" and self.slurm_mode == "srun"):
            fail(
                "launch.max_restarts",
                self.max_restarts,
                "restarts need torchrun: use launch.launcher='torchrun', or 'slurm' with launch.slurm_mode='torchrun'",
            )


class LaunchJob(Protocol):
    """The run a launcher starts: its name (the job name), its output folder and the launch settings."""

    name: str
    launch: LaunchConfig

    @property
    def resolved_run_dir(self) -> Path: ...

"""torchrun, Slurm and mpirun launchers: not implemented yet (see README, Status)."""

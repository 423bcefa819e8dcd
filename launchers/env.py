"""Which rank am I? One answer for every way seqmoe can be started.

``discover_environment()`` reads the launcher's environment and returns a ``DistEnv``;
``DistEnv.export()`` writes it back as the torchrun-style variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that ``ParallelContext.initialize``
reads. Sources, first match wins:

1. torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT all set (also what a
   torchrun inside a Slurm job gives its workers, so it must come before Slurm).
2. slurm: a task of an ``srun`` step (SLURM_PROCID and SLURM_STEP_ID; the batch script has
   SLURM_PROCID=0 too, but it is not rank 0 of the job). The master is the first host of
   SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID, so every task computes the
   same address without talking to the others.
3. mpi: started by mpiexec/mpirun (PMI_SIZE, OMPI_COMM_WORLD_SIZE, ...). Ranks come from
   mpi4py's COMM_WORLD; rank 0 picks a free port and broadcasts it. An mpiexec inside a Slurm
   allocation starts its ranks under srun-started proxies, which carry the proxy's SLURM_PROCID:
   when the MPI and Slurm variables disagree, the MPI ones win.
4. single: one process.

A half-set or contradictory environment is an error that names the variables and the fix:
guessing would make ranks disagree about the world and hang in the first collective.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["DistEnv", "LaunchEnvError", "discover_environment", "first_host", "slurm_port"]

Source = Literal["torchrun", "slurm", "mpi", "single"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# (size variable, rank variable) of the MPI launchers we recognise
MPI_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI
    ("PMI_SIZE", "PMI_RANK"),  # MPICH hydra, Intel MPI
    ("PMIX_SIZE", "PMIX_RANK"),  # PMIx launchers (prterun)
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),  # MVAPICH2
)
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or contradicts itself; the message says how to fix it."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and how ranks find each other."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Source

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the torchrun-style variables, so torch.distributed's ``env://`` init finds them."""
        target = os.environ if environ is None else environ
        target.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def discover_environment(
    environ: Mapping[str, str] | None = None, *, expected_world_size: int | None = None
) -> DistEnv:
    """This process's rank, world and rendezvous address, from whichever launcher started it.

    ``expected_world_size`` (launch.nnodes × launch.nproc_per_node) turns a job that started
    a different number of processes than the config asks for into an error now, instead of a
    plan for the wrong number of ranks later. It is not checked for a single process.
    """
    env = os.environ if environ is None else environ
    mpi = next(((size, rank) for size, rank in MPI_VARS if size in env or rank in env), None)
    # the batch script of a job also has SLURM_PROCID=0; only the tasks of an srun step have a step id
    slurm_task = "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if "RANK" in env or "WORLD_SIZE" in env:
        dist = _from_torchrun(env)
        size_var = "WORLD_SIZE"
    elif slurm_task and not (mpi and _mpi_inside_slurm_step(env, *mpi)):
        dist = _from_slurm(env)
        size_var = "SLURM_NTASKS"
    elif mpi:
        dist = _from_mpi(env, *mpi)
        size_var = mpi[0]
    else:
        if "SLURM_PROCID" in env:
            _check_batch_script(env)
        return DistEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), _port_or_free(env), "single")
    if expected_world_size is not None and dist.world_size != expected_world_size:
        raise LaunchEnvError(
            f"{size_var}={dist.world_size} ({dist.source} started {dist.world_size} processes) but the config "
            f"expects {expected_world_size} ranks (launch.nnodes × launch.nproc_per_node); start the job with "
            f"`seqmoe launch`, or set --launch.nnodes/--launch.nproc_per_node to match the job"
        )
    return dist


def _int(env: Mapping[str, str], name: str, fix: str) -> int:
    if name not in env:
        raise LaunchEnvError(f"{name} is not set; {fix}")
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"{name}={env[name]!r} is not an integer; {fix}") from None


def _check_ranks(rank: int, size: int, local_rank: int, local_size: int, names: tuple[str, ...], fix: str) -> None:
    rank_var, size_var, local_var, local_size_var = names
    if size < 1:
        raise LaunchEnvError(f"{size_var}={size} must be >= 1; {fix}")
    if not 0 <= rank < size:
        raise LaunchEnvError(f"{rank_var}={rank} is not in [0, {size_var}={size}); {fix}")
    if not 1 <= local_size <= size:
        raise LaunchEnvError(f"{local_size_var}={local_size} is not in [1, {size_var}={size}]; {fix}")
    if not 0 <= local_rank < local_size:
        raise LaunchEnvError(f"{local_var}={local_rank} is not in [0, {local_size_var}={local_size}); {fix}")


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    fix = (
        "torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together; start the job with "
        "`seqmoe launch` or torchrun, or unset the stray variables"
    )
    missing = [name for name in TORCHRUN_VARS if name not in env]
    if missing:
        present = [name for name in TORCHRUN_VARS if name in env]
        raise LaunchEnvError(f"{', '.join(present)} set but {', '.join(missing)} missing; {fix}")
    rank, size = _int(env, "RANK", fix), _int(env, "WORLD_SIZE", fix)
    local_rank = _int(env, "LOCAL_RANK", fix)
    # every torchrun sets LOCAL_WORLD_SIZE; a hand-made environment without it is taken as one node
    local_size = _int(env, "LOCAL_WORLD_SIZE", fix) if "LOCAL_WORLD_SIZE" in env else size
    _check_ranks(rank, size, local_rank, local_size, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), fix)
    return DistEnv(rank, size, local_rank, local_size, env["MASTER_ADDR"], _int(env, "MASTER_PORT", fix), "torchrun")


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    fix = "run one task per rank with `srun` inside an allocation (sbatch/salloc), e.g. through `seqmoe launch`"
    rank, size = _int(env, "SLURM_PROCID", fix), _int(env, "SLURM_NTASKS", fix)
    local_rank = _int(env, "SLURM_LOCALID", fix)
    local_size_var = next(
        (v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if v in env), None
    )
    if local_size_var is None:
        raise LaunchEnvError(f"SLURM_NTASKS_PER_NODE and SLURM_TASKS_PER_NODE are not set; {fix}")
    node = _int(env, "SLURM_NODEID", fix) if "SLURM_NODEID" in env else 0
    if local_size_var == "SLURM_NTASKS_PER_NODE":  # one number for every node
        local_size = _int(env, local_size_var, fix)
    else:  # compressed per-node counts
        local_size = _tasks_on_node(env[local_size_var], node, local_size_var, fix)
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_size_var)
    _check_ranks(rank, size, local_rank, local_size, names, fix)
    job_id = _int(env, "SLURM_JOB_ID", fix)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in env:
        addr = first_host(env["SLURM_JOB_NODELIST"])
    else:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST is not set, so the master node is unknown; {fix}")
    port = _int(env, "MASTER_PORT", fix) if "MASTER_PORT" in env else slurm_port(job_id)
    return DistEnv(rank, size, local_rank, local_size, addr, port, "slurm")


def _mpi_inside_slurm_step(env: Mapping[str, str], size_var: str, rank_var: str) -> bool:
    """True when an mpiexec inside a Slurm step started this process: its proxies are the srun
    tasks, so SLURM_PROCID numbers the proxies, not the ranks. (srun --mpi=pmi2 sets both alike.)"""
    mpi_size, mpi_rank = env.get(size_var), env.get(rank_var)
    return (mpi_rank is not None and mpi_rank != env.get("SLURM_PROCID")) or (
        mpi_size is not None and mpi_size != env.get("SLURM_NTASKS")
    )


def _check_batch_script(env: Mapping[str, str]) -> None:
    """A multi-task job's batch script is one process, not rank 0 of the job: refuse to pretend."""
    tasks = env.get("SLURM_NTASKS", "1")
    if tasks.strip() != "1":
        raise LaunchEnvError(
            f"this process runs in the batch script of Slurm job {env.get('SLURM_JOB_ID', '?')} (SLURM_PROCID set, "
            f"no SLURM_STEP_ID) and the job has SLURM_NTASKS={tasks}: start one task per rank with `srun` (or "
            "torchrun under srun), e.g. the script that `seqmoe launch --launch.launcher=slurm` writes"
        )


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every node, different for neighbouring jobs."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _tasks_on_node(spec: str, node: int, name: str, fix: str) -> int:
    """Slurm's compressed per-node counts, e.g. ``2(x3),1``: node 0..2 run 2 tasks, node 3 runs 1."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchEnvError(f"{name}={spec!r} is not a Slurm task count like '2' or '2(x3),1'; {fix}")
        counts += [int(match[1])] * int(match[2] or 1)
    if not 0 <= node < len(counts):
        raise LaunchEnvError(f"SLURM_NODEID={node} but {name}={spec!r} describes {len(counts)} node(s); {fix}")
    return counts[node]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist (``gpu[07-09,12],cpu1`` -> ``gpu07``).

    ``scontrol show hostnames`` is the authority; the parser covers the common
    ``prefix[ranges]`` form when scontrol is missing or cannot reach its config.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; set MASTER_ADDR to the first node")
    prefix, ranges = match[1], match[2]
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _from_mpi(env: Mapping[str, str], size_var: str, rank_var: str) -> DistEnv:
    fix = (
        "start it with the mpiexec of the MPI that mpi4py was built for (with the mpich wheel: "
        "`pip install -e .[mpich]`, then the mpiexec next to this Python), e.g. through `seqmoe launch`"
    )
    # a launcher may set only the rank variable (PMIx); mpi4py is the authority, the variables a cross-check
    declared = {name: _int(env, name, fix) for name in (rank_var, size_var) if name in env}
    try:
        # imported only here: importing mpi4py.MPI initialises MPI
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchEnvError(
            f"{size_var} is set (an MPI launch) but mpi4py cannot be imported ({exc}); {fix}"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    seen = {rank_var: rank, size_var: size}
    if any(seen[name] != value for name, value in declared.items()):
        library = MPI.Get_library_version().splitlines()[0].strip()
        said = ", ".join(f"{name}={value}" for name, value in declared.items())
        raise LaunchEnvError(
            f"mpi4py sees rank {rank} of a world of {size} but the launcher set {said}: the launcher and mpi4py "
            f"({library}) are different MPIs; {fix}"
        )
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    num_nodes = comm.allreduce(int(local_rank == 0))
    master = None
    if rank == 0:
        # one node: loopback always works; several: the other nodes must reach this host by name
        default_addr = "127.0.0.1" if num_nodes == 1 else socket.gethostname()
        master = (env.get("MASTER_ADDR", default_addr), _port_or_free(env))
    addr, port = comm.bcast(master, root=0)
    return DistEnv(rank, size, local_rank, local_size, addr, port, "mpi")


def _port_or_free(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port that was free a moment ago (the store binds it right after)."""
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT", "set MASTER_PORT to a free TCP port number, or unset it")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
